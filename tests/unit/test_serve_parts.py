"""Unit tests of the serving parts that need no model and no Ray: API keys, guard, router, metrics."""

from __future__ import annotations

import collections
import hashlib

import pytest

from chatforge.config import AuthSpec, GuardSpec, ToxicitySpec, VariantSpec
from chatforge.serve.auth import ApiKeys, check_bind, key_digest, read_digest_file
from chatforge.serve.guard import Guard, Verdict
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.router import Router, sticky_point

# ---------------------------------------------------------------- auth


def test_keys_from_env(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", " alpha-key , beta-key,,")
    keys = ApiKeys.from_spec(AuthSpec(api_keys_env="TEST_KEYS"))
    assert keys.enabled and len(keys) == 2
    key_id = keys.verify("Bearer alpha-key")
    assert key_id == hashlib.sha256(b"alpha-key").hexdigest()[:12]
    assert keys.verify("bearer beta-key") is not None  # the scheme is case-insensitive
    assert keys.verify("Bearer beta-key") != key_id
    for bad in (None, "", "Bearer", "Bearer ", "alpha-key", "Basic alpha-key", "Bearer alpha-keyX", "Bearer alpha"):
        assert keys.verify(bad) is None, bad
    assert "alpha-key" not in repr(keys)


def test_keys_from_digest_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEYS", raising=False)
    path = tmp_path / "keys.sha256"
    path.write_text(f"# team keys\n\n{key_digest('s3cret')}  -\n  {key_digest('other').upper()}\n")
    keys = ApiKeys.from_spec(AuthSpec(api_keys_file=str(path)))
    assert keys.enabled and len(keys) == 2
    assert keys.verify("Bearer s3cret") == key_digest("s3cret")[:12]
    assert keys.verify("Bearer other") is not None
    assert keys.verify("Bearer " + key_digest("s3cret")) is None  # the digest itself is not a key


def test_env_and_file_together(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_API_KEYS", "from-env")
    path = tmp_path / "keys"
    path.write_text(key_digest("from-file") + "\n")
    keys = ApiKeys.from_spec(AuthSpec(api_keys_file=str(path)))
    assert keys.verify("Bearer from-env") and keys.verify("Bearer from-file")


def test_bad_digest_line_names_file_and_line(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# ok\n{key_digest('a')}\nmy-plain-key\n")
    with pytest.raises(ValueError, match=r"keys:3: not a SHA-256 hex digest") as err:
        read_digest_file(path)
    assert "my-plain-key" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_digest_file(tmp_path / "missing")


def test_no_keys_means_disabled(monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEYS", raising=False)
    keys = ApiKeys.from_spec(AuthSpec())
    assert not keys.enabled
    assert keys.verify("Bearer anything") is None


def test_check_bind(monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEYS", raising=False)
    off = ApiKeys.from_spec(AuthSpec())
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        check_bind(host, off)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="no API key is configured"):
            check_bind(host, off)
    check_bind("0.0.0.0", ApiKeys([hashlib.sha256(b"k").digest()]))


# ---------------------------------------------------------------- guard

TOXIC = "shut up you stupid fucking idiot"
CLEAN = "Could you explain how bread dough rises?"


@pytest.fixture(scope="module")
def blocking_guard():
    return Guard(GuardSpec(input_policy="block", output_policy="block"))


def test_guard_blocks_toxic_input_and_output(blocking_guard):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": CLEAN},
        {"role": "assistant", "content": "Yeast makes gas."},
        {"role": "user", "content": TOXIC},
    ]
    verdict = blocking_guard.check_input(messages)
    assert verdict.blocked and verdict.flagged and verdict.score >= 0.8
    assert blocking_guard.check_output(TOXIC).blocked
    assert blocking_guard.refusal == GuardSpec().refusal


def test_guard_passes_clean_text(blocking_guard):
    verdict = blocking_guard.check_input([{"role": "user", "content": CLEAN}])
    assert not verdict.flagged and not verdict.blocked and verdict.score < 0.5
    assert not blocking_guard.check_output("Yeast eats sugar and releases carbon dioxide.").flagged
    assert blocking_guard.check_output("") == Verdict(0.0, False, False)


def test_guard_scores_only_user_turns(blocking_guard):
    # an abusive system prompt or earlier assistant turn is not the user's doing
    messages = [{"role": "system", "content": TOXIC}, {"role": "assistant", "content": TOXIC}]
    assert not blocking_guard.check_input(messages + [{"role": "user", "content": CLEAN}]).flagged
    parts = [{"role": "user", "content": [{"type": "text", "text": TOXIC}]}]
    assert blocking_guard.check_input(parts).blocked


def test_guard_flag_and_off_policies():
    guard = Guard(GuardSpec(input_policy="flag", output_policy="off"))
    verdict = guard.check_input([{"role": "user", "content": TOXIC}])
    assert verdict.flagged and not verdict.blocked
    assert guard.check_output(TOXIC) == Verdict(0.0, False, False)


def test_guard_threshold():
    guard = Guard(GuardSpec(toxicity=ToxicitySpec(threshold=1.0), output_policy="block"))
    assert not guard.check_output(TOXIC).blocked  # no probability reaches 1.0 exactly


def test_guard_passes_benign_templates_and_refuses_abusive_ones(blocking_guard):
    """The default guard (the "targeted" scorer at 0.8) on the labeled template set: no benign answer refused
    (words a lexical filter trips on, identity groups), >= 90% of the abusive ones the rules were written against."""
    from chatforge.safety.evalset import template_set

    examples = template_set()
    refused_benign = [e.text for e in examples if not e.abusive and blocking_guard.check_output(e.text).blocked]
    assert refused_benign == []
    asked = [e for e in examples if not e.abusive][:20]
    assert not any(blocking_guard.check_input([{"role": "user", "content": e.text}]).blocked for e in asked)
    abusive = [e for e in examples if e.abusive and e.split == "dev"]
    refused = sum(blocking_guard.check_output(e.text).blocked for e in abusive)
    assert refused / len(abusive) >= 0.9
    verdict = blocking_guard.check_input([{"role": "user", "content": "I hope you die"}])
    assert verdict.blocked and verdict.score == 1.0


def test_guard_all_off_builds_no_scorer():
    guard = Guard(GuardSpec(input_policy="off", output_policy="off"))
    assert guard.scorer is None
    assert not guard.check_input([{"role": "user", "content": TOXIC}]).flagged


# ---------------------------------------------------------------- router


POINT_OF_USER_1 = 0.00240279386773122  # xxh64 of "chatforge-router:user-1" over 2**64


def _variants(**weights: float) -> list[VariantSpec]:
    return [VariantSpec(name=name, weight=weight) for name, weight in weights.items()]


def test_router_split_matches_weights():
    router = Router(_variants(a=0.7, b=0.2, c=0.1))
    counts = collections.Counter(router.choose(f"user-{i}") for i in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.7) < 0.03
    assert abs(counts["b"] / 10_000 - 0.2) < 0.03
    assert abs(counts["c"] / 10_000 - 0.1) < 0.03


def test_router_is_sticky_and_stable():
    router = Router(_variants(a=1, b=1))
    first = {f"user-{i}": router.choose(f"user-{i}") for i in range(200)}
    again = Router(_variants(a=1, b=1))  # a new router (as in another replica or process) agrees
    assert all(again.choose(key) == variant for key, variant in first.items())
    assert set(first.values()) == {"a", "b"}
    # pinned: the mapping must not change between Python runs (hash() would) nor between releases, or
    # users would switch variants on upgrade
    assert sticky_point("user-1") == pytest.approx(POINT_OF_USER_1, abs=1e-12)


def test_router_requested_variant():
    router = Router(_variants(main=1, canary=0))
    assert router.names == ["main", "canary"]
    assert router.choose("anyone", requested="canary") == "canary"
    with pytest.raises(ValueError, match="known: main, canary"):
        router.choose("anyone", requested="nope")


def test_router_zero_weight_never_chosen_by_weight():
    router = Router(_variants(canary=0, main=1, shadow=0))
    assert {router.choose(f"k{i}") for i in range(2000)} == {"main"}
    assert {router.choose(None) for _ in range(500)} == {"main"}


def test_router_without_key_is_random_by_weight():
    router = Router(_variants(a=3, b=1))
    counts = collections.Counter(router.choose(None) for _ in range(8000))
    assert abs(counts["a"] / 8000 - 0.75) < 0.04


# ---------------------------------------------------------------- metrics


def test_metrics_work_without_ray():
    import ray

    assert not ray.is_initialized()
    metrics = ServeMetrics()
    metrics.request("a", "200")
    metrics.tokens("a", prompt=12, completion=0)  # a zero count is skipped (Ray counters refuse it)
    metrics.latency("a", 0.42)
    metrics.batch("a", 8)
    metrics.guard_block("a", "input")
    metrics.feedback(-1)
    metrics.engine_load("a", running=3, waiting=0)
    with pytest.raises(ValueError):
        metrics.guard_block("a", "sideways")
    assert not ray.is_initialized()  # recording did not start a Ray
