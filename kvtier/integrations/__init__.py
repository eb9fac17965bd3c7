"""Serving-engine adapters (Hugging Face transformers first)."""
