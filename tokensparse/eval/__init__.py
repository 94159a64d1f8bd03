"""Evaluation harness: task generators, the shipped natural-text corpus, and metrics."""
