"""Offline corpus tools for GLM: tokenizers, Megatron MMIDIDX corpora, precomputed span masks."""
