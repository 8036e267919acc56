"""Architecture knowledge as data: one mapping per model family (STYLE.md item 6).

The layer driver, the Hessian collector and the rotation code read these mappings; no library code branches on
a model type. Adding a Llama-like family means adding a mapping, not an ``if``.
"""

from __future__ import annotations

from quant.arch.mapping import *  # noqa: F403  (the package re-exports exactly the mapping module's names)
from quant.arch.mapping import __all__ as __all__
