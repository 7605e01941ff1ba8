"""Checkpoint analysis and parameter summaries."""
