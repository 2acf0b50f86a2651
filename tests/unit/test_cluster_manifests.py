"""cluster/: every file parses; the KubeRay manifests fit KubeRay's CRD schemas and the launcher config Ray's launcher
schema; what they name exists; token auth is on and dashboards bind safely everywhere; the Grafana dashboard charts
only metrics chatforge exports; and no shipped config holds a secret."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from helpers import kuberay_schemas

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SOURCE = ROOT / "platform"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DASHBOARD = CLUSTER / "grafana" / "chatforge.json"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_VERSION = importlib.metadata.version("ray")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


CLUSTER_SPEC_KEY = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}


def ray_cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a KubeRay manifest: its spec, or the cluster spec inside a RayJob or RayService."""
    spec = manifest["spec"]
    return spec[CLUSTER_SPEC_KEY[manifest["kind"]]] if manifest["kind"] in CLUSTER_SPEC_KEY else spec


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# ---------------------------------------------------------------- files parse, Dockerfile variants


def test_every_config_under_cluster_parses():
    paths = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-finetune.yaml",
        "kuberay/rayservice.yaml",
        "grafana/chatforge.json",
    }
    for path in paths:
        assert isinstance(load(path), dict), path


def test_dockerfile_builds_a_cpu_and_a_cuda_variant_of_the_installed_versions():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["VARIANT"] == "cpu" and args["RAY_VERSION"] == RAY_VERSION
    assert args["TORCH_VERSION"] == importlib.metadata.version("torch").split("+")[0]
    assert "FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA} AS base-cuda" in text
    assert "FROM base-${VARIANT}" in text
    assert re.search(r"^\s*cpu\) index=https://download\.pytorch\.org/whl/cpu ;", text, re.M)
    assert re.search(r'^\s*cuda\) index="https://download\.pytorch\.org/whl/\$\{CUDA\}" ;', text, re.M)
    # torch, then deepspeed built against it, then the package: the order `make setup` uses
    torch_at, deepspeed_at, package_at = (text.index(s) for s in ('"torch==', "--no-build-isolation", '".${extras}"'))
    assert torch_at < deepspeed_at < package_at
    deepspeed = re.search(r'"(deepspeed[^"]+)"', text).group(1)
    assert f'"{deepspeed}"' in (ROOT / "pyproject.toml").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs/", ".venv/", ".git/"} <= set(ignored)


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_fits_the_crd_schema(path):
    assert kuberay_schemas.errors(load(path)) == []


def test_crd_check_names_the_path_of_each_mistake():
    manifest = load(CLUSTER / "kuberay" / "raycluster.yaml")
    broken = copy.deepcopy(manifest)
    broken["spec"]["headGroupSpec"]["rayStartParam"] = {}
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    found = "\n".join(kuberay_schemas.errors(broken))
    assert "spec.headGroupSpec: Additional properties are not allowed ('rayStartParam' was unexpected)" in found
    assert "spec.workerGroupSpecs.0: 'groupName' is a required property" in found
    assert "spec.workerGroupSpecs.0.maxReplicas: '8' is not of type 'integer'" in found


def test_launcher_config_fits_rays_own_schema():
    (package_dir,) = importlib.util.find_spec("ray").submodule_search_locations
    schema = json.loads((Path(package_dir) / "autoscaler" / "ray-schema.json").read_text())
    config = load(LAUNCHER)
    jsonschema.Draft7Validator(schema).validate(config)
    broken = {**config, "head_node": "head"}
    with pytest.raises(jsonschema.ValidationError, match="'head_node' was unexpected"):
        jsonschema.Draft7Validator(schema).validate(broken)


# ---------------------------------------------------------------- what the manifests name exists

REPO_PATH = re.compile(r"\b(?:pipelines|serve|cluster|docs|tests)/[\w./-]+\.(?:ya?ml|json|py|md)\b")


def module_file(module: str) -> Path | None:
    base = SOURCE.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_every_repository_path_named_under_cluster_exists():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        for named in REPO_PATH.findall(path.read_text()):
            assert (ROOT / named).exists(), f"{path.relative_to(ROOT)} names {named}, which does not exist"


def test_modules_and_entrypoints_exist():
    texts = [p.read_text() for p in [LAUNCHER, *KUBERAY]]
    modules = {m for text in texts for m in re.findall(r"python -m (chatforge[\w.]*)", text)}
    assert "chatforge.cli" in modules
    for module in modules:
        assert module_file(module) and module_file(module).name in ("__main__.py", f"{module.split('.')[-1]}.py")
    service = load(CLUSTER / "kuberay" / "rayservice.yaml")
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        module, function = app["import_path"].split(":")
        tree = ast.parse(module_file(module).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, app["import_path"]


def test_the_finetune_job_runs_the_recipe_from_the_images_copy_of_the_repository():
    job = load(CLUSTER / "kuberay" / "rayjob-finetune.yaml")
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith(f"cd {workdir} && python -m chatforge.cli train pipelines/finetune-zero2.yaml")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    # checkpoints and data on storage that every pod mounts
    shared = [
        load(ROOT / "pipelines" / "finetune-zero2.yaml")["train"]["output"],
        *re.findall(r"--data (\S+)", entrypoint),
    ]
    for container in containers(job["spec"]["rayClusterSpec"]):
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in shared:
            assert any(path.startswith(mount + "/") for mount in mounts), (container["name"], path)


def test_the_rayservice_serves_production_yaml_with_secrets_from_a_secret():
    service = load(CLUSTER / "kuberay" / "rayservice.yaml")
    production = load(ROOT / "serve" / "production.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == production
    args = production["applications"][0]["args"]
    wanted = {args["auth"]["api_keys_env"], args["feedback"]["url_env"]}
    for container in containers(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in container.get("env", [])}
        for name in wanted:
            assert set(env[name]) == {"name", "valueFrom"}, (container["name"], name)
            assert set(env[name]["valueFrom"]["secretKeyRef"]) == {"name", "key"}


# ---------------------------------------------------------------- token auth, bind addresses, no Secret data


def launcher_start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def test_token_auth_is_on_in_every_cluster_config():
    config = load(LAUNCHER)
    mounted = list(config["file_mounts"])
    for command in launcher_start_commands(config):
        assert "RAY_AUTH_MODE=token" in command, command
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command).group(1).replace("$HOME", "/home/ray")
        assert any(token_path.startswith(m + "/") for m in mounted), token_path
    assert len(launcher_start_commands(config)) == 2
    for path in KUBERAY:
        spec = ray_cluster_spec(load(path))
        assert spec["authOptions"] == {"mode": "token"}, path.name
        assert spec["rayVersion"] == RAY_VERSION, path.name  # KubeRay's token auth needs Ray 2.52 or later
    assert not any("RAY_AUTH_TOKEN=" in p.read_text() for p in CLUSTER.rglob("*") if p.is_file())


def test_dashboards_are_not_exposed_by_default():
    head = [c for c in load(LAUNCHER)["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0]
    for path in KUBERAY:
        head_group = ray_cluster_spec(load(path))["headGroupSpec"]
        assert head_group.get("serviceType", "ClusterIP") == "ClusterIP", path.name
        assert not head_group.get("enableIngress"), path.name
        assert head_group["rayStartParams"]["num-cpus"] == "0", path.name


def test_manifests_reference_secrets_and_ship_none():
    for path in KUBERAY:
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] != "Secret", path.name
            for container in containers(ray_cluster_spec(document)):
                for env in container.get("env", []):
                    secretish = re.search(r"KEY|TOKEN|SECRET|PASSWORD|URL", env["name"])
                    assert not (secretish and "value" in env), (path.name, env["name"])


# ---------------------------------------------------------------- Grafana: only metrics the code exports

METRIC_CLASSES = {"Counter", "Gauge", "Histogram"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_WORDS |= {"unless", "inf", "nan"}


def prometheus_series(kind: str, name: str) -> list[str]:
    """What Ray exports a ``ray.util.metrics`` metric as: a ``ray_`` prefix; a counter's name ends in ``_total``, a
    histogram's series in ``_bucket``, ``_sum`` and ``_count``."""
    base = f"ray_{name}"
    if kind == "Counter":
        return [base if base.endswith("_total") else f"{base}_total"]
    if kind == "Histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]


def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """Prometheus name -> (chatforge name, tag keys) of every ``Counter``/``Gauge``/``Histogram`` made under
    platform/chatforge. A call with a literal name gives that name; a module that also makes metrics from names
    held in variables (a table of gauges, say) gives each of its other ``chatforge_*`` string constants, with the
    kind and tags of those calls."""
    exported = {}
    for path in (SOURCE / "chatforge").rglob("*.py"):
        tree = ast.parse(path.read_text())
        literal, computed = set(), []
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kind = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if kind not in METRIC_CLASSES or name is None:
                continue
            tags = next((k.value for k in node.keywords if k.arg == "tag_keys"), None)
            tag_keys = {e.value for e in tags.elts} if isinstance(tags, ast.Tuple | ast.List) else set()
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                literal.add(name.value)
                exported.update({s: (name.value, tag_keys) for s in prometheus_series(kind, name.value)})
            elif not isinstance(name, ast.Constant):
                computed.append((kind, tag_keys))
        constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        for name in sorted(c for c in constants - literal if re.fullmatch(r"chatforge_\w+", c)):
            for kind, tag_keys in computed:
                exported.update({s: (name, tag_keys) for s in prometheus_series(kind, name)})
    return exported


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {m for block in re.findall(r"\{([^}]*)\}", text) for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", block)}
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    labels |= {label for block in re.findall(grouping, text) for label in re.findall(r"\w+", block)}
    text = re.sub(grouping, " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    words = re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text)
    return {w.group(0) for w in words if not re.match(r"\s*\(", text[w.end() :])} - PROMQL_WORDS, labels


def test_promql_names_separates_metrics_from_functions_and_labels():
    expr = 'histogram_quantile(0.99, sum by (variant, le) (rate(ray_a_bucket{kind="x y", variant=~"$v"}[5m]))) / 60'
    assert promql_names(expr) == ({"ray_a_bucket"}, {"variant", "le", "kind"})
    assert promql_names("sum(rate(ray_b_total[$__rate_interval])) by (run) + ray_c")[0] == {"ray_b_total", "ray_c"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = load(DASHBOARD)
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
            queries.append((f"${variable['name']}", f"sum by ({label}) ({metric})"))
    return queries


def test_dashboard_has_a_prometheus_datasource_variable_that_every_query_uses():
    dashboard = load(DASHBOARD)
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    uid = f"${{{datasource['name']}}}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
            assert all(target["datasource"]["uid"] == uid for target in panel["targets"]), panel["title"]


def test_dashboard_charts_only_metrics_and_tags_the_code_exports():
    exported = exported_metrics()
    assert "ray_chatforge_request_latency_seconds_bucket" in exported  # the collector finds serve/metrics.py's
    problems = []
    for title, expr in dashboard_queries():
        metrics, labels = promql_names(expr)
        assert metrics, (title, expr)
        for metric in sorted(metrics - set(exported)):
            problems.append(f"{title}: {metric} is not exported by platform/chatforge")
        allowed = {"le"} | {tag for m in metrics & set(exported) for tag in exported[m][1]}
        if metrics <= set(exported) and not labels <= allowed:
            problems.append(f"{title}: labels {sorted(labels - allowed)} are not tags of {sorted(metrics)}")
    assert problems == []


# ---------------------------------------------------------------- no key-shaped strings in shipped configs

SCANNED = ("cluster", "serve", "pipelines")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|<[^>]*>|\$\{?\w+\}?|\*+|\.{3}")
SECRET_PATTERNS = [
    ("an OpenAI-style API key", re.compile(r"\bsk-[A-Za-z0-9]{16,}")),
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
    (
        "a literal password",
        re.compile(r"(?i)\b(?:password|passwd|pwd)\b[\"']?[ \t]*[:=][ \t]*[\"']?(?![{\[])([^\s\"',#]+)"),
    ),
    ("a URL with an inline password", re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s@/]+)@")),
]
SECRET_NAME_VALUE = re.compile(
    r"(?i)\b[\w.-]*(?:key|token|secret|password|passwd|credential)s?\b[\"']?[ \t]*[:=][ \t]*[\"']?([A-Za-z0-9+/=_-]{20,})"
)


def looks_random(value: str) -> bool:
    """Long hex, or base64 mixing digits, upper and lower case: what generated keys look like, not names."""
    value = value.rstrip("=")
    if re.fullmatch(r"[0-9a-fA-F]{32,}", value):
        return bool(re.search(r"\d", value) and re.search(r"[a-fA-F]", value))
    return all(re.search(p, value) for p in (r"\d", "[a-z]", "[A-Z]"))


def key_shaped(text: str) -> list[tuple[int, str]]:
    """(line number, what) of every key-shaped string; a placeholder (USER:PASSWORD, <token>, ${VAR}) is not one."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in SECRET_PATTERNS:
            for match in pattern.finditer(line):
                if not (match.groups() and PLACEHOLDER.fullmatch(match.group(1))):
                    found.append((number, what))
        if any(looks_random(m.group(1)) for m in SECRET_NAME_VALUE.finditer(line)):
            found.append((number, "a key-like value assigned to a key, token or secret"))
    return found


def test_no_shipped_config_holds_a_key_shaped_string():
    paths = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*") if p.is_file())
    assert len(paths) > 10
    found = [f"{p.relative_to(ROOT)}:{n}: {what}" for p in paths for n, what in key_shaped(p.read_text())]
    assert found == []


PLANTED = [  # built from parts, so that this file holds none of them whole
    ("OPENAI_API_KEY=" + "sk-" + "a1B2c3D4" * 3, "an OpenAI-style API key"),
    ("aws_access_key_id: " + "AKIA" + "Z7Q2" * 4, "an AWS access key id"),
    ("-----BEGIN " + "RSA PRIVATE KEY-----", "a private key"),
    ("  password: " + "hunter2-prod", "a literal password"),
    ("url: postgresql+psycopg://app:" + "s3cr3t" + "@db:5432/chatforge", "a URL with an inline password"),
    ("api_token: " + "9f86d081884c7d65" * 3, "a key-like value assigned to a key, token or secret"),
    (
        "client_secret = '" + "Zm9vYmFyYmF6cXV4" + "MTIzNDU2Nzg5MA==" + "'",
        "a key-like value assigned to a key, token or secret",
    ),
]


@pytest.mark.parametrize(("line", "what"), PLANTED, ids=[what for _, what in PLANTED])
def test_the_scanner_catches_a_planted_key(tmp_path, line, what):
    planted = tmp_path / "values.yaml"
    planted.write_text(f"name: chatforge\n{line}\n")
    assert (2, what) in key_shaped(planted.read_text())


def test_the_scanner_lets_placeholders_and_references_through():
    clean = [
        "password: ${DB_PASSWORD}",
        "#   CHATFORGE_FEEDBACK_URL   postgresql+psycopg://USER:PASSWORD@HOST:5432/chatforge",
        "api_keys_env: CHATFORGE_API_KEYS",
        "secretKeyRef: {name: chatforge-serve, key: api-keys}",
        "RAY_AUTH_TOKEN_PATH=$HOME/.chatforge/auth_token ray start --head",
        "token: <the token from ray get-auth-token>",
    ]
    assert key_shaped("\n".join(clean)) == []


def test_the_gpu_groups_hold_every_serving_replica_at_its_max():
    """serve/production.yaml's variants at max_replicas fit the GPU worker groups (one 1-GPU replica per node)."""
    production = yaml.safe_load((ROOT / "serve" / "production.yaml").read_text())
    variants = production["applications"][0]["args"]["variants"]
    most = sum(v["autoscaling"]["max_replicas"] * v["num_gpus"] for v in variants)
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"]["gpu-1x"]["max_workers"] >= most
    types = launcher["available_node_types"].values()
    assert launcher["max_workers"] >= sum(t.get("max_workers", 0) for t in types)  # the cluster cap leaves room
    kuberay = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    (gpu,) = [group for group in kuberay["spec"]["workerGroupSpecs"] if group["groupName"] == "gpu"]
    assert gpu["maxReplicas"] >= most
