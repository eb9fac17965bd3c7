"""Serving-engine adapters (Hugging Face transformers first)."""

from __future__ import annotations

MIN_TRANSFORMERS = (5, 24)


def require_transformers() -> None:
    """Refuse a transformers older than 5.24: kvtier hands models their KV cache as ``cache=``, a keyword that
    older versions (which call it ``past_key_values``) swallow without a word, so a cached prefix would be
    silently dropped and the suffix computed as if it started the text."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ImportError(f"kvtier needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (the model's "
                          f"`cache=` keyword), found {transformers.__version__}: pip install 'transformers>=5.24'")
