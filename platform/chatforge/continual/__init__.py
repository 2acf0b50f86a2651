"""Continual learning: feedback from the served model back into its next training round (`chatforge loop`)."""
