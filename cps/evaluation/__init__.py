"""Perplexity and zero-shot task evaluation."""
