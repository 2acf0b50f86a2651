"""chatforge: train and run chat assistants on Ray."""

__version__ = "0.1.0"
