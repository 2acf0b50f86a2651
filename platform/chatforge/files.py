"""Writing output files whole: a reader sees the previous file or the new one, never a part."""

from __future__ import annotations

import os
import uuid


def write_atomic(path: str, text: str) -> None:
    """``text`` to ``path`` through a temporary file in the same dir and a rename: all of it or none of it."""
    staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
