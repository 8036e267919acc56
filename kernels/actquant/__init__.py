"""Per-token symmetric activation quantization for W4A4 (QuaRot): ``ref`` (torch spec), ``triton`` (kernel),
``launch`` (validation + op, optional int4 nibble packing)."""
