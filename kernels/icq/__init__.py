"""ICQuant GEMM: ``ref`` (torch spec), ``triton`` (tile-parallel position decode + mask-select GEMM),
``launch`` (validation, decode and GEMM launchers + op). Block configs are ``kernels.wgemm.configs``'."""
