"""Evaluation: how good a model is on held-out data."""
