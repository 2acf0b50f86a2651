import pytest

from chatforge.config import SpecError, load_spec, parse_override


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    spec = load_spec(None)
    assert spec.curate.steps == ["normalize", "filters", "pii", "dedup", "toxicity", "augment", "split"]
    assert spec.curate.sources[0].format == "chitchat"


def test_unknown_key_names_dotted_path_and_file(tmp_path):
    path = write(tmp_path, "curate:\n  dedup:\n    num_perms: 64\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "curate.dedup.num_perms: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_overrides_are_typed_by_the_model(tmp_path):
    path = write(tmp_path, "curate:\n  dedup:\n    num_perm: 64\n    bands: 8\n")
    spec = load_spec(path, ["curate.dedup.threshold=0.9", "curate.filters.languages=[en, de]", "ray.num_cpus=2"])
    assert spec.curate.dedup.num_perm == 64
    assert spec.curate.dedup.threshold == 0.9
    assert spec.curate.filters.languages == ["en", "de"]
    assert spec.ray.num_cpus == 2


def test_bad_override_value_names_the_key():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["curate.dedup.num_perm=lots"])
    assert "curate.dedup.num_perm" in str(err.value)


def test_unknown_override_key_is_rejected():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["curate.dedupe.exact=false"])
    assert "curate.dedupe" in str(err.value)


def test_override_syntax_error():
    with pytest.raises(SpecError):
        parse_override("no-equals-sign")


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path, "curate: [unclosed\n"))
    with pytest.raises(SpecError, match="mapping of sections"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_cross_field_checks():
    with pytest.raises(SpecError, match="sum to 1"):
        load_spec(None, ["curate.split.train=0.5"])
    with pytest.raises(SpecError, match="must divide"):
        load_spec(None, ["curate.dedup.bands=7"])
    with pytest.raises(SpecError, match="needs a path"):
        load_spec(None, ["curate.sources=[{name: x, format: openai}]"])


def test_shipped_pipelines_parse():
    from pathlib import Path

    for path in sorted(Path("pipelines").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# chatforge "), f"{path} must start with the command that runs it"
        load_spec(path)
