"""Shared fixtures: the real SmolLM2 model (converted once per machine, loaded once per run) and markers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter without a GPU; this must be set before any @triton.jit decorator
    # runs, i.e. before the first test module imports kvtier.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct, fp32, CPU, eval mode."""
    from kvtier.integrations.smollm2 import load_smollm2

    torch.manual_seed(0)
    return load_smollm2(dtype=torch.float32)
