"""The canary's config changes as pure functions, its ratings from a real SQLite store, and which canary is live
across cycles."""

from __future__ import annotations

import time

import pytest

from chatforge.continual.canary import (
    INGRESS,
    CanaryError,
    Change,
    app_config,
    current_weights,
    deploy_body,
    live_canary,
    promoted_model,
    set_ingress_weights,
    shifted,
    variant_ratings,
    with_canary_weight,
)
from chatforge.serve.feedback import CompletionRecord, FeedbackStore

CONFIG = {
    "name": "chatforge",
    "route_prefix": "/",
    "import_path": "chatforge.serve.app:build_app",
    "args": {"variants": [{"name": "main", "model": "/m"}, {"name": "b", "model": "/b", "weight": 3}]},
    "deployments": [{"name": INGRESS, "user_config": {"weights": {"main": 1, "b": 3}}, "num_replicas": 1}],
}


def details(config=CONFIG, **extra) -> dict:
    return {
        "http_options": {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 130.0},
        "applications": {"chatforge": {"deployed_app_config": config}, **extra},
    }


def test_the_canary_takes_its_share_and_the_others_keep_their_proportions():
    weights = with_canary_weight({"main": 1.0, "b": 3.0}, "c", 0.2)
    assert weights == {"main": pytest.approx(0.2), "b": pytest.approx(0.6), "c": 0.2}
    with pytest.raises(CanaryError, match="no variant other than the canary"):
        with_canary_weight({"main": 0.0}, "c", 0.1)


def test_promotion_and_rollback_move_one_variants_traffic_and_leave_the_rest():
    weights = {"main": 0.6, "b": 0.3, "c": 0.1}
    assert shifted(weights, "main", "c") == {"main": 0.0, "b": 0.3, "c": pytest.approx(0.7)}
    assert shifted(weights, "c", "main") == {"main": pytest.approx(0.7), "b": 0.3, "c": 0.0}


def test_the_ingress_weights_change_and_nothing_else_does():
    changed = set_ingress_weights(CONFIG, {"main": 0.5, "b": 0.5})
    (ingress,) = changed["deployments"]
    assert ingress == {"name": INGRESS, "user_config": {"weights": {"main": 0.5, "b": 0.5}}, "num_replicas": 1}
    assert CONFIG["deployments"][0]["user_config"]["weights"] == {"main": 1, "b": 3}  # the original is untouched
    assert current_weights(CONFIG, CONFIG["args"]) == {"main": 1.0, "b": 3.0}
    bare = {**CONFIG, "deployments": []}
    assert current_weights(bare, {"variants": [{"name": "main", "weight": 2.0}]}) == {"main": 2.0}


def test_the_put_keeps_the_other_config_apps_and_the_running_address():
    other = {"deployed_app_config": {"name": "other", "import_path": "x:y"}}
    imperative = {"deployed_app_config": None}
    body = deploy_body(details(other=other, imperative=imperative), "chatforge", {"name": "chatforge", "new": 1})
    assert [app["name"] for app in body["applications"]] == ["other", "chatforge"]
    assert body["applications"][1]["new"] == 1
    assert body["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 130.0}
    # an application not running yet is added beside the others
    added = deploy_body(details(other=other), "fresh", {"name": "fresh"})
    assert [app["name"] for app in added["applications"]] == ["chatforge", "other", "fresh"]


def test_an_app_started_with_serve_run_or_missing_is_refused_with_what_to_do():
    with pytest.raises(CanaryError, match="started with serve.run.*serve deploy"):
        app_config(details(config=None), "chatforge")
    with pytest.raises(CanaryError, match=r"no Serve application named 'nope'.*\['chatforge'\]"):
        app_config(details(), "nope")


def record(completion_id: str, variant: str) -> CompletionRecord:
    return CompletionRecord(completion_id, time.time(), variant, None, "[]", "a", 1.0, 1, 1, "pass", None, False)


def test_ratings_per_variant_count_only_those_since_the_canary_went_live(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'store.db'}", scrub_pii=False)
    for i, (variant, rating) in enumerate([("main", 1), ("main", -1), ("c", 1), ("c", 1), ("c", 0), ("x", 1)]):
        store.record_completion(record(f"r{i}", variant))
        store.record_feedback(f"r{i}", rating, None, None)
    assert variant_ratings(store.engine, ["c", "main"], since=0) == {"c": (2, 2), "main": (1, 2)}  # 0s not counted
    assert variant_ratings(store.engine, ["c", "main"], since=time.time() + 60) == {"c": (0, 0), "main": (0, 0)}
    store.dispose()


def test_the_live_canary_is_the_last_deployed_and_not_yet_decided():
    deployed = Change("deploy", "chatforge", "candidate-0001", "main", {"main": 0.9}, 1.0, "", "/c1").as_dict()
    waited = {**deployed, "action": "wait"}
    promoted = {**deployed, "action": "promote"}
    history = [{"record": {"deployment": deployed}}, {"record": {"canary": waited, "deployment": None}}]
    assert live_canary(history).canary == "candidate-0001" and promoted_model(history) is None
    history.append({"record": {"canary": promoted, "deployment": None}})
    assert live_canary(history) is None and promoted_model(history) == "/c1"
    failed = {"action": "deploy", "app": "chatforge", "canary": "candidate-0004", "model": "/c4", "error": "boom"}
    assert live_canary([*history, {"record": {"deployment": failed}}]) is None  # a failed deploy is not live
    assert live_canary([{"record": None}]) is None


def test_the_dashboard_calls_carry_rays_token_when_there_is_one(monkeypatch, tmp_path):
    from chatforge.jobs import auth_headers

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("local-ray-token\n")  # what a local Ray 2.60 writes
    assert auth_headers() == {"Authorization": "Bearer local-ray-token"}
