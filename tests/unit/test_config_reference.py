"""docs/reference is what `python -m chatforge.reference` generates from chatforge.config: never stale."""

from pathlib import Path

from chatforge.reference import main, pages

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference"


def test_the_committed_reference_is_current():
    assert main(["--check", str(REFERENCE)]) == 0, "run: .venv/bin/python -m chatforge.reference docs/reference"


def test_every_key_of_the_spec_is_on_a_page_and_a_change_is_seen(tmp_path):
    text = "".join(pages().values())
    for key in ("`curate.condition.endpoint.url`", "`serve.variants[].tag`", "`train.overwrite`", "`method`",
                "`ray.dashboard_port`"):  # fmt: skip
        assert key in text
    assert main([str(tmp_path)]) == 0 and main(["--check", str(tmp_path)]) == 0
    (tmp_path / "serve.md").write_text("old\n")
    assert main(["--check", str(tmp_path)]) == 1
