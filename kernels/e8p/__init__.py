"""E8P decode-GEMM: Triton kernel (``triton.py``), launcher (``launch.py``) and torch reference (``ref.py``)."""
