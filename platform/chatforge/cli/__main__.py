"""`python -m chatforge.cli`, the same as the `chatforge` script."""

from chatforge.cli import app

app()
