"""Full precision for the quantizers, whatever autocast their caller runs under.

A bf16 calibration forward is a legitimate speed choice (``hessians.compute_dtype``), but autocast is a thread-local
context: a quantizer called inside it silently runs its matmuls in bf16. The shipped sequential recipe did exactly
that (GPTQ's ``Err1 @ U`` lazy update in bf16: 6.6 % of codes differed from the fp32 sweep at n = 1536). Every
quantizer entry point is therefore wrapped in :func:`exact`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import ParamSpec, TypeVar

import torch

__all__ = ["exact"]

P = ParamSpec("P")
R = TypeVar("R")


def exact(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast switched off on every device type that could have it on."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(*args, **kwargs)

    return wrapper
