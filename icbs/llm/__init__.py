"""Pruning causal language models (Hugging Face transformers) one decoder block at a time."""
