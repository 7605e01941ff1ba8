"""Decoding, generation, in-context-learning evaluation and retrieval."""
