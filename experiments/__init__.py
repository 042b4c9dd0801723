"""Evaluation: the editing CLI, summaries, and per-case metrics."""
