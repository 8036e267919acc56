"""Pure-math quantizer core: grids, RTN, Hessian accumulation, GPTQ and LDLQ over plain tensors.

Every module here imports only ``torch``, ``numpy`` and the standard library, has no import-time side
effects, and exposes pure functions ``quantize_*(W, [H,] cfg) -> QuantizedWeight`` (see ALGORITHMS.md §1–4).
Import the submodules explicitly, e.g. ``from quant.gptq import GPTQConfig, quantize_gptq``.
"""

__all__: list[str] = []
