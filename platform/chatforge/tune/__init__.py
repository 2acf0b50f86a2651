"""Hyperparameter search on Ray Tune over the training spec (`chatforge tune`)."""
