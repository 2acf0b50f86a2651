"""Augment: condition responses on metadata (a system prompt and a style/domain tag per source) and, optionally,
slice multi-turn conversations into one extra sample per earlier assistant turn.

Slices are new rows (``augmented=True``, ``meta.parent_id``); they are counted apart from ``kept`` in the manifest
and take their parent's split, so no conversation leaks between train and val.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pyarrow as pa

from chatforge.config import AugmentSpec
from chatforge.data.batches import RecordBatchFn, RecordStep
from chatforge.data.schema import Record, is_kept

AUGMENT_COLUMNS = {"augmented": pa.bool_(), "parent_id": pa.string()}


# The curation's default; training renders a dataset's tag (``train.data[].tag``) with it too.
DEFAULT_TAG_TEMPLATE = AugmentSpec.model_fields["tag_template"].default


def with_tag(
    messages: list[dict[str, str]], tag: str | None, template: str = DEFAULT_TAG_TEMPLATE
) -> list[dict[str, str]]:
    """``tag``, rendered by ``template``, at the head of the conversation's system prompt, which it becomes when
    there is none. The one place a tag is rendered: curation's ``augment.tags`` and training's dataset tags."""
    if tag is None:
        return messages
    head = template.format(tag=tag)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{head} {messages[0]['content']}".strip()}, *messages[1:]]
    return [{"role": "system", "content": head}, *messages]


def condition(messages: list[dict[str, str]], source: str, spec: AugmentSpec) -> list[dict[str, str]]:
    """Add the source's system prompt (unless the conversation has its own) and put its tag at the head of it."""
    prompt = spec.system_prompts.get(source, spec.default_system_prompt)
    if prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": prompt}, *messages]
    return with_tag(messages, spec.tags.get(source), spec.tag_template)


def turn_slices(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Every prefix that ends with an assistant turn, except the whole conversation itself."""
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [messages[: end + 1] for end in ends[:-1]]


def augment_records(records: list[Record], spec: AugmentSpec) -> list[Record]:
    out = []
    for record in records:
        record.update(augmented=False, parent_id=None)
        out.append(record)
        if not is_kept(record):
            continue
        record["messages"] = condition(record["messages"], record["source"], spec)
        tag = spec.tags.get(record["source"])
        if tag is not None:
            record["meta"] = json.dumps({**json.loads(record["meta"] or "{}"), "tag": tag}, ensure_ascii=False)
        if spec.slice_turns:
            for number, messages in enumerate(turn_slices(record["messages"]), start=1):
                out.append(
                    {
                        **record,
                        "id": f"{record['id']}#slice{number}",
                        "messages": messages,
                        "augmented": True,
                        "parent_id": record["id"],
                        "_stage_seconds": None,
                    }
                )
    return out


@dataclass(frozen=True)
class AugmentStep(RecordStep):
    spec: AugmentSpec

    def record_fn(self) -> RecordBatchFn:
        return RecordBatchFn(functools.partial(augment_records, spec=self.spec), stage="augment", adds=AUGMENT_COLUMNS)
