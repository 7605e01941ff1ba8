"""Corpora, tokenizers, masking and the grain input pipeline."""
