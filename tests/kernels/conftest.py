"""Kernel tests run the Triton kernels in the interpreter when there is no GPU.

triton 3.9 reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, i.e. when
``kernels.<family>.triton`` is first imported (lazily, by the launchers) — so setting it here, at collection
time and before any test runs, is early enough. With CUDA present the compiled kernels are used instead and
the same parametrized tests run on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
