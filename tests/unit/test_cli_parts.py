"""The CLI's pure helpers: how --input names and formats sources."""

from __future__ import annotations

import pytest
import typer

from chatforge.cli.curate import _inputs_as_sources


@pytest.mark.parametrize(
    ("path", "fmt", "name"),
    [
        ("dumps/a.json", "sharegpt", "a"),
        ("dumps/a.jsonl", "openai", "a"),
        ("dumps/a.JSONL", "openai", "a"),
        ("dumps/a.ndjson", "openai", "a"),
        ("dumps/a.jsonl.gz", "openai", "a"),
        ("dumps/part.v2.json.zst", "sharegpt", "part.v2"),
        ("dumps/a.parquet", "parquet", "a"),
    ],
)
def test_the_format_follows_the_suffix_under_any_compression(path, fmt, name):
    (source,) = _inputs_as_sources([path], None)
    assert (source.format, source.name, source.path) == (fmt, name, path)


def test_same_stems_get_distinct_names():
    names = [s.name for s in _inputs_as_sources(["x/a.jsonl", "y/a.jsonl.gz"], None)]
    assert names == ["a", "a-2"]


def test_an_unknown_suffix_asks_for_format(capsys):
    with pytest.raises(typer.Exit) as caught:
        _inputs_as_sources(["dumps/a.txt"], None)
    assert caught.value.exit_code == 2
    assert "--format" in capsys.readouterr().err


def test_format_option_wins_over_suffix():
    (source,) = _inputs_as_sources(["dumps/a.jsonl.gz"], "sharegpt")
    assert source.format == "sharegpt"
