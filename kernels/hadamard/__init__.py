"""Fast Walsh–Hadamard transform along the last dim: ``ref`` (torch butterfly + Paley matrices),
``triton`` (kernel, power-of-two sizes), ``launch`` (``hadamard_transform`` for n = 2^k and m·2^k, m ∈ {12, 20, 28})."""
