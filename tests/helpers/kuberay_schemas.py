"""The KubeRay CRD schemas that cluster/kuberay/ is checked against: vendored from a KubeRay release, and a strict
validator over them.

Regenerate tests/data/kuberay/*.json from a clone of github.com/ray-project/kuberay (a bare mirror works too):

    .venv/bin/python tests/helpers/kuberay_schemas.py PATH/TO/kuberay v1.5.1

Each file holds the ``v1`` openAPIV3Schema of one CRD without its ``description`` fields and without ``status``
(manifests set neither), and the tag and commit it came from; tests/data/kuberay/README.md names them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "kuberay"
CRD_DIR = "ray-operator/config/crd/bases"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
API_VERSION = "ray.io/v1"


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def vendor(repo: Path, ref: str) -> list[Path]:
    """Write one compact JSON schema per CRD, read from ``ref`` of the KubeRay repository at ``repo``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", f"{ref}^{{commit}}").strip()
    written = []
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load(git("show", f"{commit}:{CRD_DIR}/{name}"))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1]]
        schema = without_descriptions(version["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        vendored = {
            "apiVersion": API_VERSION,
            "kind": kind,
            "source": {"repository": "ray-project/kuberay", "ref": ref, "commit": commit, "path": f"{CRD_DIR}/{name}"},
            "schema": schema,
        }
        path = DATA_DIR / f"{kind.lower()}.json"
        path.write_text(json.dumps(vendored, separators=(",", ":"), sort_keys=True) + "\n")
        written.append(path)
    return written


def load(kind: str) -> dict:
    """The vendored file of ``kind``: apiVersion, kind, source and schema."""
    return json.loads((DATA_DIR / f"{kind.lower()}.json").read_text())


def strict(schema: Any) -> Any:
    """The schema with unknown fields made errors. The API server prunes unknown fields silently, so a misspelt key
    would be lost, not refused: every object that lists its properties gets ``additionalProperties: false``, except
    where the CRD keeps unknown fields on purpose (``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def errors(manifest: dict) -> list[str]:
    """What is wrong with a KubeRay manifest against its kind's CRD schema, each as ``dotted.path: message``:
    unknown fields, missing required fields, wrong scalar types, enum and quantity-pattern violations."""
    import jsonschema

    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: {kind!r} is not one of {sorted(CRD_FILES)}"]
    vendored = load(kind)
    found = [] if manifest.get("apiVersion") == vendored["apiVersion"] else [f"apiVersion: not {API_VERSION}"]
    validator = jsonschema.Draft7Validator(strict(vendored["schema"]))
    for error in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(part) for part in error.absolute_path) or "(top)"
        found.append(f"{path}: {error.message}")
    return found


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} KUBERAY_REPO REF   (e.g. ~/src/kuberay v1.5.1)")
    for written in vendor(Path(sys.argv[1]), sys.argv[2]):
        print(written)
