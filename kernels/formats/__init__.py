"""Serving formats other engines load, as pure tensor layouts (no transformers, no gguf).

``kernels.formats.gptq``: GPTQ checkpoint tensors (``qweight``/``qzeros``/``scales``/``g_idx``);
``kernels.formats.ggml``: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks. Both encode quantizer codes and grids as they
are (never re-quantize) and refuse, with the reason, what the target cannot hold exactly. The writers that add
configs, tokenizers and files live in ``tasks.export``.
"""
