"""Builders shared by tests (tiny models, fixtures that are more than a few lines)."""
