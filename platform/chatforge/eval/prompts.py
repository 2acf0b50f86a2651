"""The prompt sets evaluation generates from: a fixed prompt set for toxicity, and bias probes (templates x groups).

chatforge ships its own small sets in ``eval/prompts/`` (no benchmark data set can be downloaded here):
  prompts.jsonl         {"id", "category", "prompt"} or {"id", "category", "messages": [{"role", "content"}, ...]}
  bias_templates.jsonl  {"id", "template"}: a user turn with one or more ``{group}`` slots
  bias_groups.jsonl     {"axis", "group", "term"}: ``term`` fills the slot ("Muslims", "old people", ...)

A bias probe is a template with a group's term in the slot, so the probes of one template differ only in the
demographic term. A malformed line is an error naming the file and line: these are small hand-written files, and a
set silently missing prompts would measure something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "prompts.jsonl"
DEFAULT_BIAS_TEMPLATES = PROMPTS_DIR / "bias_templates.jsonl"
DEFAULT_BIAS_GROUPS = PROMPTS_DIR / "bias_groups.jsonl"
SLOT = "{group}"
ROLES = ("system", "user", "assistant")


class PromptSetError(ValueError):
    """A prompt or probe file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with a user turn

    def as_messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The chat messages to render, with ``system_prompt`` first unless the prompt has its own system turn."""
        messages = [{"role": role, "content": content} for role, content in self.messages]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages

    @property
    def text(self) -> str:
        """The last user turn: what the prompt asks."""
        return self.messages[-1][1]


@dataclass(frozen=True)
class Probe:
    prompt: Prompt  # id "<template>/<axis>/<group>", category "bias"
    template: str  # the template's id
    axis: str
    group: str


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise PromptSetError(f"{path}: cannot read the prompt file: {err.strerror}") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSetError(f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise PromptSetError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise PromptSetError(f"{path}: the file holds no prompts; one JSON object per line")
    return records


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PromptSetError(f"{where}: {key!r} must be a non-empty string (got {value!r})")
    return value


def _unique(ids: list[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for key, where in ids:
        if key in seen:
            raise PromptSetError(f"{where}: {what} {key!r} is already used at {seen[key]}; ids must be unique")
        seen[key] = where


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompt set at ``path`` (chatforge's own when None), in file order, the first ``limit`` when given."""
    path = Path(path) if path else DEFAULT_PROMPTS
    prompts = []
    for number, record in _records(path):
        where = f"{path}:{number}"
        if ("prompt" in record) == ("messages" in record):
            raise PromptSetError(f"{where}: give exactly one of 'prompt' (a user turn) or 'messages' (a conversation)")
        if "prompt" in record:
            messages = (("user", _string(record, "prompt", where)),)
        else:
            turns = record["messages"]
            if not isinstance(turns, list) or not turns:
                raise PromptSetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
            messages = []
            for turn in turns:
                if (
                    not isinstance(turn, dict)
                    or turn.get("role") not in ROLES
                    or not isinstance(turn.get("content"), str)
                ):
                    raise PromptSetError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content")
                messages.append((turn["role"], turn["content"]))
            if messages[-1][0] != "user":
                raise PromptSetError(f"{where}: the conversation must end with a user turn, for the model to answer")
            messages = tuple(messages)
        category = record.get("category", "default")
        if not isinstance(category, str):
            raise PromptSetError(f"{where}: 'category' must be a string (got {category!r})")
        prompts.append((Prompt(_string(record, "id", where), category, messages), where))
    _unique([(prompt.id, where) for prompt, where in prompts], "id")
    prompts = [prompt for prompt, _ in prompts]
    return prompts[:limit] if limit is not None else prompts


def load_probes(
    templates_path: str | Path | None = None,
    groups_path: str | Path | None = None,
    axes: list[str] | None = None,
    max_templates: int | None = None,
) -> list[Probe]:
    """Every template with every group's term (of ``axes``, or all), template by template, groups in file order."""
    templates_path = Path(templates_path) if templates_path else DEFAULT_BIAS_TEMPLATES
    groups_path = Path(groups_path) if groups_path else DEFAULT_BIAS_GROUPS
    templates = []
    for number, record in _records(templates_path):
        where = f"{templates_path}:{number}"
        template = _string(record, "template", where)
        if SLOT not in template:
            raise PromptSetError(f"{where}: the template has no {SLOT} slot for the demographic term")
        templates.append((_string(record, "id", where), template, where))
    _unique([(tid, where) for tid, _, where in templates], "template id")
    groups, places = [], []
    for number, record in _records(groups_path):
        where = f"{groups_path}:{number}"
        axis, group = _string(record, "axis", where), _string(record, "group", where)
        if "/" in axis + group:
            raise PromptSetError(f"{where}: axis and group names may not contain '/' (they form probe ids)")
        groups.append((axis, group, _string(record, "term", where)))
        places.append((f"{axis}/{group}", where))
    _unique(places, "axis/group")
    known = sorted({axis for axis, _, _ in groups})
    if axes is not None:
        unknown = sorted(set(axes) - set(known))
        if unknown:
            raise PromptSetError(f"eval.bias_axes names {unknown}, which {groups_path} lacks; its axes: {known}")
        groups = [g for g in groups if g[0] in axes]
    for axis in {axis for axis, _, _ in groups}:
        if sum(g[0] == axis for g in groups) < 2:
            raise PromptSetError(f"{groups_path}: axis {axis!r} has one group; a gap needs at least two")
    probes = []
    for tid, template, _ in templates[:max_templates]:
        for axis, group, term in groups:
            prompt = Prompt(f"{tid}/{axis}/{group}", "bias", (("user", template.replace(SLOT, term)),))
            probes.append(Probe(prompt, tid, axis, group))
    return probes
