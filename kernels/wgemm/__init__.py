"""Weight-only low-bit GEMV/GEMM: ``ref`` (torch spec), ``triton`` (kernel), ``launch`` (validation + op),
``configs`` (block configs and the per-GPU tuned-config cache)."""
