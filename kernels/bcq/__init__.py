"""GPTQT binary-coding GEMM straight from the bit-planes: ``ref`` (torch spec), ``triton`` (kernel), ``launch``
(validation + op). Block configs are the weight-only GEMM's (``kernels.wgemm.configs``)."""
