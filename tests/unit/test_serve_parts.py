"""Unit tests of the serving parts that need no model and no Ray: API keys, guard, router, metrics."""

from __future__ import annotations

import collections
import hashlib

import pytest

from chatforge.config import AuthSpec, GuardSpec, ToxicitySpec, VariantSpec
from chatforge.serve.auth import ApiKeys, check_access, is_local_client, key_digest, read_digest_file
from chatforge.serve.guard import Guard, StreamGuard, Verdict
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.router import Router, reweighted, sticky_point

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


LOOPBACK = ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]")
PUBLIC = ("0.0.0.0", "::", "10.1.2.3", "example.org", "")


def test_without_keys_nothing_starts_unless_anonymous_on_a_known_loopback_bind(monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEYS", raising=False)
    off = ApiKeys.from_spec(AuthSpec())
    for host in (*LOOPBACK, *PUBLIC, None):  # not even on loopback without saying so
        with pytest.raises(ValueError, match=r"no API key is configured.*anonymous: true"):
            check_access(off, False, host)
    for host in LOOPBACK:
        check_access(off, True, host)
    for host in PUBLIC:
        with pytest.raises(ValueError, match="no API key is configured: anyone"):
            check_access(off, True, host)
    with pytest.raises(ValueError, match="cannot be told"):  # an unknown bind is never taken for loopback
        check_access(off, True, None)
    keys = ApiKeys([hashlib.sha256(b"k").digest()])
    for host in (*LOOPBACK, *PUBLIC, None):
        check_access(keys, False, host)
        check_access(keys, True, host)  # anonymous does not switch configured keys off


def test_keys_travel_as_digests(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "alpha-key,beta-key")
    keys = ApiKeys.from_spec(AuthSpec(api_keys_env="TEST_KEYS"))
    digests = keys.hex_digests()
    assert digests == [key_digest("alpha-key"), key_digest("beta-key")]
    assert not any("alpha-key" in d or "beta-key" in d for d in digests)
    monkeypatch.delenv("TEST_KEYS")  # a replica elsewhere has no such env var: the digests are enough
    received = ApiKeys.from_hex(digests)
    assert received.verify("Bearer alpha-key") == keys.verify("Bearer alpha-key") is not None
    assert received.verify("Bearer gamma-key") is None
    assert not ApiKeys.from_hex([]).enabled
    with pytest.raises(ValueError, match="SHA-256 hex"):
        ApiKeys.from_hex(["alpha-key"])


def test_anonymous_access_is_for_local_clients_only():
    assert all(is_local_client(host) for host in ("127.0.0.1", "::1", "localhost"))
    assert not any(is_local_client(host) for host in ("10.0.0.7", "0.0.0.0", "", None))


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


def test_guard_scores_every_turn_the_client_sends(blocking_guard):
    # a client writes system and assistant turns as freely as user turns: any of them can carry the abuse
    for role in ("system", "user", "assistant"):
        messages = [{"role": "user", "content": CLEAN}, {"role": role, "content": TOXIC}]
        assert blocking_guard.check_input(messages).blocked, role
        parts = [{"role": role, "content": [{"type": "text", "text": TOXIC}]}, {"role": "user", "content": CLEAN}]
        assert blocking_guard.check_input(parts).blocked, role
    clean = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Sure."}]
    assert not blocking_guard.check_input(clean + [{"role": "user", "content": CLEAN}]).flagged


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


class RecordingGuard(Guard):
    """The default blocking guard, remembering every text it scored."""

    def __init__(self) -> None:
        super().__init__(GuardSpec(output_policy="block"))
        self.scored: list[str] = []

    def check_output(self, text: str) -> Verdict:
        self.scored.append(text)
        return super().check_output(text)


def stream_through(censor: StreamGuard, pieces: list[str]) -> tuple[str, bool]:
    """Feed pieces as the app does (release when due, and at the end); the text released and whether it was cut."""
    released = []
    for i, piece in enumerate(pieces):
        censor.add(piece)
        final = i == len(pieces) - 1
        if final or censor.due():
            out = censor.release(final)
            if out is None:
                return "".join(released), True
            released.append(out[0])
    return "".join(released), False


def words(text: str) -> list[str]:
    return [word + " " for word in text.split()]


def test_stream_guard_sends_a_clean_answer_whole_and_every_part_scored_in_context():
    pieces = [f"plant{i} " for i in range(60)]  # no repeats, so a scored window is found where it was taken
    guard = RecordingGuard()
    censor = StreamGuard(guard, window=16)
    sent = ""
    for i, piece in enumerate(pieces):
        censor.add(piece)
        final = i == len(pieces) - 1
        if not (final or censor.due()):
            continue
        scored_before = len(guard.scored)
        out, _ = censor.release(final)
        spans = [(censor.text.find(t), censor.text.find(t) + len(t)) for t in guard.scored[scored_before:]]
        for position in range(len(sent), len(sent) + len(out)):  # each character sent: scored with 16 each side
            assert any(a <= max(0, position - 16) and b >= min(len(censor.text), position + 17) for a, b in spans)
        sent += out
    assert sent == "".join(pieces) and len(guard.scored) > 5
    assert guard.scored[-1] == sent  # at the end, the whole answer, as the non-streaming path scores it
    assert all(len(text) <= 16 * 3 + len(pieces[0]) for text in guard.scored[:-1])  # bounded work per release


def test_stream_guard_never_sends_the_toxic_part():
    guard = RecordingGuard()
    pieces = words(CLEAN + " " + CLEAN + " " + TOXIC + " " + CLEAN)
    text, cut = stream_through(StreamGuard(guard, window=32), pieces)
    assert cut
    assert not any(word in text for word in ("stupid", "fucking", "idiot"))
    assert text and CLEAN.startswith(text[:20])  # what went before was sent
    # a toxic answer of one piece (the end of a short answer) sends nothing
    assert stream_through(StreamGuard(guard, window=32), [TOXIC]) == ("", True)


def test_stream_guard_holds_logprobs_with_their_text_and_records_the_worst_score():
    censor = StreamGuard(Guard(GuardSpec(output_policy="block")), window=8)
    for i, piece in enumerate(words(CLEAN)):
        censor.add(piece, (f"lp{i}",))
    released, logprobs = censor.release()
    held = len(censor.text) - len(released)
    assert held >= 8 and len(logprobs) < len(words(CLEAN))
    assert "".join(words(CLEAN)[: len(logprobs)]) == released[: len("".join(words(CLEAN)[: len(logprobs)]))]
    rest, more = censor.release(final=True)
    assert released + rest == censor.text and logprobs + more == [f"lp{i}" for i in range(len(words(CLEAN)))]
    assert not censor.worst.blocked and censor.worst.score < 0.5
    blocked = StreamGuard(Guard(GuardSpec(output_policy="block")), window=8)
    blocked.add(TOXIC)
    assert blocked.release(final=True) is None and blocked.worst.blocked and blocked.release() is None


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


def test_reweighting_moves_only_the_users_in_the_shares_that_changed():
    variants = _variants(main=1, canary=0)
    before = Router(variants)
    after = Router(reweighted(variants, {"main": 0.9, "canary": 0.1}))
    assert after.weights == [0.9, 0.1] and variants[1].weight == 0  # the spec's own list is left as it was
    users = [f"user-{i}" for i in range(5_000)]
    moved = [u for u in users if before.choose(u) != after.choose(u)]
    assert all(after.choose(u) == "canary" for u in moved)  # nobody moves from one canary share to another
    assert abs(len(moved) / len(users) - 0.1) < 0.02
    assert Router(reweighted(variants, {"canary": 3})).weights == [1.0, 3.0]  # an unnamed variant keeps its weight


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"nope": 1}, "unknown variants \\['nope'\\]"),
        ({"main": -1}, "numbers >= 0"),
        ({"main": "half"}, "numbers >= 0"),
        ({"main": 0}, "at least one variant needs a weight > 0"),
    ],
)
def test_bad_weights_are_refused_with_what_is_wrong(weights, message):
    with pytest.raises(ValueError, match=message):
        reweighted(_variants(main=1, canary=0), weights)


def test_a_variants_training_tag_reaches_its_model_as_training_rendered_it():
    """A model trained on tagged conversations sees its tag at the head of the system prompt; a served variant with
    that tag gives its model the same, whatever the client sends."""
    from types import SimpleNamespace

    from chatforge.config import VariantSpec
    from chatforge.data.augment import with_tag
    from chatforge.serve.app import ChatIngress

    ingress = SimpleNamespace(
        variants={"tagged": VariantSpec(name="tagged", tag="support"), "plain": VariantSpec(name="plain")}
    )
    model_messages = ChatIngress.func_or_class._model_messages
    asked = [{"role": "user", "content": "my order is late"}]
    assert model_messages(ingress, "tagged", asked) == with_tag(asked, "support")
    assert model_messages(ingress, "tagged", asked)[0]["role"] == "system"
    own = [{"role": "system", "content": "Be brief."}, *asked]
    assert model_messages(ingress, "tagged", own)[0]["content"].endswith("Be brief.")
    assert model_messages(ingress, "plain", asked) == asked


def test_serve_quickstart_yaml_is_the_app_chatforge_serve_starts_from_the_quickstart_spec():
    """`serve run serve/quickstart.yaml` and `chatforge serve pipelines/quickstart.yaml` serve the same settings."""
    from pathlib import Path

    import yaml

    from chatforge.config import ServeSpec, load_spec

    root = Path(__file__).resolve().parents[2]
    args = yaml.safe_load((root / "serve" / "quickstart.yaml").read_text())["applications"][0]["args"]
    from_yaml = ServeSpec.model_validate(args).model_dump()
    from_spec = load_spec(str(root / "pipelines" / "quickstart.yaml"), []).serve.model_dump()
    for spec in (from_yaml, from_spec):
        for variant in spec["variants"]:
            variant.pop("model")  # serve run names the trained model's dir; chatforge serve takes --model
    assert from_yaml == from_spec
