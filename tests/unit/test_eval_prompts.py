"""The shipped prompt set and bias probes load, expand as templates x groups, and bad files name file and line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chatforge.eval.prompts import SLOT, PromptSetError, load_probes, load_prompts


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_shipped_prompt_set_has_unique_ids_and_prompts_that_invite_rude_replies():
    prompts = load_prompts()
    assert len(prompts) >= 30 and len({p.id for p in prompts}) == len(prompts)
    categories = Counter(p.category for p in prompts)
    assert {"everyday", "hostile_user", "insult_request", "repeat_bait"} <= set(categories)
    assert categories["everyday"] < len(prompts) / 2  # most prompts provoke
    assert all(p.as_messages()[-1]["role"] == "user" and p.text.strip() for p in prompts)
    assert [p.id for p in load_prompts(limit=3)] == [p.id for p in prompts[:3]]


def test_shipped_probes_cover_the_axes_and_differ_only_in_the_term():
    probes = load_probes()
    axes = {p.axis for p in probes}
    assert {"religion", "ethnicity", "gender", "sexuality", "disability", "age"} <= axes
    by_template: dict[str, list] = {}
    for probe in probes:
        by_template.setdefault(probe.template, []).append(probe)
    groups = {(p.axis, p.group) for p in probes}
    assert all(len(ps) == len(groups) for ps in by_template.values())  # every template x every group
    assert len({p.prompt.id for p in probes}) == len(probes)
    for same_template in by_template.values():
        # blanking each probe's term gives one text per template
        from chatforge.eval.prompts import DEFAULT_BIAS_GROUPS

        terms = {
            (g["axis"], g["group"]): g["term"] for g in map(json.loads, DEFAULT_BIAS_GROUPS.read_text().splitlines())
        }
        blanked = {p.prompt.text.replace(terms[(p.axis, p.group)], SLOT, 1) for p in same_template}
        assert len(blanked) == 1


def test_probe_filters():
    probes = load_probes(axes=["age"], max_templates=2)
    assert {p.axis for p in probes} == {"age"} and len({p.template for p in probes}) == 2
    with pytest.raises(PromptSetError, match=r"eval.bias_axes names \['planet'\]"):
        load_probes(axes=["planet"])


def test_messages_form_and_system_prompt(tmp_path):
    path = write(
        tmp_path / "p.jsonl",
        {"id": "a", "prompt": "hi"},
        "",
        {
            "id": "b",
            "category": "x",
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
        },
    )
    a, b = load_prompts(path)
    assert a.category == "default" and a.as_messages("sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert b.as_messages("ignored")[0] == {"role": "system", "content": "S"}  # its own system turn wins


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"p.jsonl:2: not valid JSON"),
        ('["a list"]', r"p.jsonl:2: expected a JSON object"),
        ({"id": "b"}, r"p.jsonl:2: give exactly one of 'prompt'"),
        ({"id": "b", "prompt": " "}, r"p.jsonl:2: 'prompt' must be a non-empty string"),
        ({"id": "a", "prompt": "again"}, r"p.jsonl:2: id 'a' is already used at .*p.jsonl:1"),
        ({"id": "b", "messages": [{"role": "assistant", "content": "x"}]}, "must end with a user turn"),
        ({"id": "b", "messages": [{"role": "robot", "content": "x"}]}, "each message needs a role"),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "p.jsonl", {"id": "a", "prompt": "fine"}, line)
    with pytest.raises(PromptSetError, match=message):
        load_prompts(path)


def test_bad_probe_files(tmp_path):
    groups = write(
        tmp_path / "g.jsonl",
        {"axis": "age", "group": "old", "term": "old people"},
        {"axis": "age", "group": "young", "term": "young people"},
    )
    templates = write(tmp_path / "t.jsonl", {"id": "t1", "template": "About {group}?"})
    assert [p.prompt.text for p in load_probes(templates, groups)] == ["About old people?", "About young people?"]
    with pytest.raises(PromptSetError, match=r"t2.jsonl:1: the template has no \{group\} slot"):
        load_probes(write(tmp_path / "t2.jsonl", {"id": "t1", "template": "About nobody"}), groups)
    with pytest.raises(PromptSetError, match="axis 'age' has one group"):
        load_probes(templates, write(tmp_path / "g2.jsonl", {"axis": "age", "group": "old", "term": "x"}))
    with pytest.raises(PromptSetError, match=r"g3.jsonl:2: axis/group 'age/old' is already used"):
        load_probes(templates, write(tmp_path / "g3.jsonl", *[{"axis": "age", "group": "old", "term": "x"}] * 2))
    with pytest.raises(PromptSetError, match="empty.jsonl: the file holds no prompts"):
        load_probes(write(tmp_path / "empty.jsonl", ""), groups)
    with pytest.raises(PromptSetError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")
