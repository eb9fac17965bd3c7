"""The Triton kernel runs here under the interpreter: set it before kvtier.kernels.triton_sparse is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
