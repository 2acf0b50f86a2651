"""Normalize: repair mis-decoded unicode, strip control and zero-width characters, tidy whitespace.

Role mapping happens on read (sources.py), where a source's vocabulary is known.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from chatforge.config import NormalizeSpec
from chatforge.data.batches import RecordBatchFn, RecordStep
from chatforge.data.schema import Record, is_kept

# C0/C1 controls except tab and newline, plus zero-width and bidi-override characters that only hide text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, spec: NormalizeSpec) -> str:
    """A turn's text as curation keeps it: mis-decoded unicode repaired, hidden characters stripped, whitespace tidied
    (paragraphs and case kept; dedup compares a more folded form of its own)."""
    if spec.fix_unicode and not text.isascii():
        import ftfy  # only non-ASCII text can be mojibake, and ftfy is the slow part

        text = ftfy.fix_text(text, normalization="NFC")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if spec.strip_control:
        text = _CONTROL.sub("", text)
    if spec.collapse_whitespace:
        text = _SPACES.sub(" ", text)
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_records(records: list[Record], spec: NormalizeSpec) -> list[Record]:
    for record in records:
        if is_kept(record):
            record["messages"] = [
                {"role": m["role"], "content": clean_text(m["content"], spec)} for m in record["messages"]
            ]
    return records


@dataclass(frozen=True)
class NormalizeStep(RecordStep):
    spec: NormalizeSpec

    def record_fn(self) -> RecordBatchFn:
        return RecordBatchFn(functools.partial(normalize_records, spec=self.spec), stage="normalize")
