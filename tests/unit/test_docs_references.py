"""What the docs name exists: repository files they mention, `chatforge` commands and options in their shell blocks,
the spec keys those commands override, and the spec sections their YAML snippets set."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from chatforge.config import Spec, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# paths into the repository's own trees; placeholders (CAPITALS, <...>, ...) and globs are not files
REPO_PATH = re.compile(r"(?<![\w/.-])((?:pipelines|serve|cluster|docs|benchmarks|tests|platform)/[\w./-]*[\w])")


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Each `chatforge ...` command of a shell block as argv (continuations joined; env assignments and comments
    dropped)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" # ")[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            argv = shlex.split(line, comments=True)
        except ValueError:
            continue
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv and argv[0] in ("chatforge", ".venv/bin/chatforge"):
            found.append(argv)
    return found


def cli_commands() -> dict:
    import typer

    from chatforge.cli import app

    group = typer.main.get_command(app)
    return {name: group.get_command(None, name) for name in group.list_commands(None)}


def named(path: str) -> bool:
    return not re.search(r"[A-Z]{2,}|[<>*{}]|\.\.\.", path)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_files_a_doc_names_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted(
        {
            path
            for path in REPO_PATH.findall(text)
            if named(path) and not any((base / path).exists() for base in (ROOT, ROOT / "platform" / "chatforge"))
        }
    )
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_commands_a_doc_shows_parse_and_their_overrides_are_spec_keys(doc):
    available = cli_commands()
    problems = []
    for block in blocks(doc.read_text(encoding="utf-8"), "(?:bash|sh|console)?"):
        for argv in commands(block):
            if len(argv) < 2 or argv[1].startswith("-"):
                continue
            command = available.get(argv[1])
            if command is None:
                problems.append(f"`chatforge {argv[1]}` is no command ({', '.join(sorted(available))})")
                continue
            if argv[1] == "submit":  # submit COMMAND SPEC ...: the rest is the submitted command's
                argv = argv[1:]
                command = available.get(argv[1])
                if command is None:
                    continue
            options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for token in argv[2:]:
                flag = token.split("=", 1)[0]
                if token.startswith("--") and flag not in options and flag not in ("--address", "--wait"):
                    problems.append(f"`chatforge {argv[1]}` has no option {flag}")
            spec = next((a for a in argv[2:] if a.endswith((".yaml", ".yml")) and (ROOT / a).is_file()), None)
            for token in argv[2:]:
                if re.match(r"^[a-z_]+(\.[a-z_\d]+)+=", token) and named(token.split("=", 1)[0]):
                    try:
                        load_spec(str(ROOT / spec) if spec else None, [token])
                    except SpecError as error:
                        if "unknown key" in str(error):
                            problems.append(f"`{token}`: {str(error).splitlines()[-1].strip()}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_spec_snippets_a_doc_shows_validate(doc, tmp_path):
    sections = set(Spec.model_fields)
    for number, block in enumerate(blocks(doc.read_text(encoding="utf-8"), "yaml")):
        try:
            snippet = yaml.safe_load(block)
        except yaml.YAMLError:
            continue  # a fragment (an excerpt with "..."), not a whole document
        if not isinstance(snippet, dict) or not snippet or not set(snippet) <= sections:
            continue  # a Serve config, a manifest, or a section's inner keys
        path = tmp_path / f"snippet{number}.yaml"
        path.write_text(block)
        try:
            load_spec(str(path), [])
        except SpecError as error:
            if "unknown key" in str(error):
                pytest.fail(f"{doc.name}, yaml block {number + 1}: {error}")


def test_the_checks_catch_what_they_are_for():
    argv = commands(
        "X=1 chatforge curate pipelines/curate.yaml \\\n  --input a.jsonl curate.dedup.near=false  # note\n"
    )
    assert argv == [["chatforge", "curate", "pipelines/curate.yaml", "--input", "a.jsonl", "curate.dedup.near=false"]]
    assert REPO_PATH.findall("see `pipelines/quickstart.yaml` and docs/img/job-dashboard.png.") == [
        "pipelines/quickstart.yaml",
        "docs/img/job-dashboard.png",
    ]
    assert not named("runs/OUTPUT/model") and not named("pipelines/finetune-*.yaml") and named("serve/production.yaml")
