"""quantpipe kernels: packing layouts, ``QuantLinear`` and Triton kernels with torch references.

Kept deliberately light (no imports, no ``__version__``): Hugging Face also ships a package imported as
``kernels``. Import the submodules explicitly, e.g. ``from kernels.packing import pack_codes``.
"""
