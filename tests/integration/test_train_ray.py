"""Fine-tuning on a 2-CPU Ray with 2 workers (gloo, fp32): every ZeRO stage, offload, LoRA, resume, export."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.config import load_spec
from chatforge.train.trainer import run_training
from helpers.train_data import TINY_TRAINING, write_curated
from helpers.train_faults import KillWorkerAt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_curated(tmp_path_factory.mktemp("curated"))


def train(tmp_path, data_dir, *overrides, kill_at_step=None, out="out"):
    spec = load_spec(
        None, [*TINY_TRAINING, f"train.data=[{{path: '{data_dir}'}}]", f"train.output={tmp_path / out}", *overrides]
    )
    result = run_training(spec, step_callbacks=[KillWorkerAt(kill_at_step)] if kill_at_step else [])
    rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def final_loop_state(output) -> dict:
    """``loop_state.json`` of the run's last checkpoint (the one the model was exported with)."""
    states = [json.loads(p.read_text()) for p in (output / "checkpoints").rglob("loop_state.json")]
    return max(states, key=lambda state: state["step"])


def generates(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "tell me about the garden"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer, model


def assert_learned(rows):
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    for row in (r for r in rows if "loss" in r):
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(row)
        assert row["tokens_per_s"] > 0 and row["grad_norm"] > 0
    assert any("eval_loss" in r for r in rows)


def test_zero2_trains_exports_and_records(ray_local, tmp_path, data_dir):
    result, rows = train(tmp_path, data_dir, "deepspeed.zero_stage=2", "train.max_steps=16")
    assert_learned(rows)
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert summary["data_fingerprints"] == ["fp-test"] and summary["fingerprint"] == "fp-test"
    assert summary["config"]["deepspeed"]["zero_stage"] == 2
    assert summary["final_metrics"]["step"] == 16
    assert summary["data"]["packing_efficiency"] > 0.9
    tokenizer, model = generates(tmp_path / "out" / "model")
    assert "<|im_start|>" in tokenizer.chat_template  # the template the server will use is saved with the model

    # What was exported, read back: metrics.jsonl has a row per log step (log_every=2) and per eval (eval_every=6,
    # and the last step), and training.json's final metrics are its last log and eval rows, as the run reported them.
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, 17, 2))
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12, 16]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    last_log = next(r for r in reversed(rows) if "loss" in r)
    last_eval = next(r for r in reversed(rows) if "eval_loss" in r)
    final = summary["final_metrics"]
    assert {k: final[k] for k in last_log} == last_log and {k: final[k] for k in last_eval} == last_eval
    assert final == json.loads(json.dumps(result.summary["final_metrics"]))
    assert final["exported_step"] == 16 and final["stopped_early"] is False
    assert final["total_params"] == sum(p.numel() for p in model.parameters())
    # the exported weights are the ones the last eval row describes
    exported = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()) ** 0.5
    assert exported == pytest.approx(last_eval["weight_norm"], rel=1e-6)
    assert final_loop_state(tmp_path / "out")["step"] == 16


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "offload"), [(0, False), (1, False), (3, False), (2, True)])
def test_other_zero_stages_and_offload(ray_local, tmp_path, data_dir, stage, offload):
    result, rows = train(
        tmp_path,
        data_dir,
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.offload_optimizer={str(offload).lower()}",
        "train.max_steps=12",
    )
    assert_learned(rows)
    _, model = generates(tmp_path / "out" / "model")
    assert sum(p.numel() for p in model.parameters()) == result.summary["final_metrics"]["total_params"]


def test_resume_after_worker_dies_matches_an_uninterrupted_run(ray_local, tmp_path, data_dir):
    settings = ("train.max_steps=12", "train.checkpoint_every=4", "train.eval_every=12")
    result, rows = train(tmp_path, data_dir, *settings, kill_at_step=7, out="resumed")
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [4]  # restarted from the step-4 checkpoint, not from zero
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == sorted(logged) and logged[-1] == 12
    assert logged.count(6) == 1  # steps after the checkpoint were redone once, from the checkpoint
    assert result.summary["final_metrics"]["step"] == 12

    _, straight_rows = train(tmp_path, data_dir, *settings, out="straight")
    assert not any(r.get("event") == "resumed" for r in straight_rows)
    # the same data position: the resumed run skipped exactly the micro-batches the checkpoint had consumed
    position = ("step", "epoch", "micro_batches_in_epoch")
    resumed_state, straight_state = (final_loop_state(tmp_path / out) for out in ("resumed", "straight"))
    assert {k: resumed_state[k] for k in position} == {k: straight_state[k] for k in position}
    # the same losses step by step, and the same weights after 12 steps
    for a, b in zip((r for r in rows if "loss" in r), (r for r in straight_rows if "loss" in r), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    weights = {
        out: AutoModelForCausalLM.from_pretrained(tmp_path / out / "model").state_dict()
        for out in ("resumed", "straight")
    }
    assert weights["resumed"].keys() == weights["straight"].keys()
    for name, tensor in weights["resumed"].items():
        torch.testing.assert_close(tensor, weights["straight"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_stops_the_run_and_exports_nothing(ray_local, tmp_path, data_dir):
    # Adam moves every weight by about lr in the first step: 1e30 makes the second step's activations overflow.
    with pytest.raises(Exception, match=r"step 2: the training loss .* is not finite") as failure:
        train(
            tmp_path,
            data_dir,
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.schedule=constant",
            "train.max_steps=8",
            "train.checkpoint_every=1",
            "scaling.max_failures=0",  # a retry from the step-1 checkpoint would fail the same way, only later
        )
    assert "NonFiniteLossError" in str(failure.value)
    out = tmp_path / "out"
    assert not (out / "model").exists() and not (out / "training.json").exists()
    checkpoints = list((out / "checkpoints").rglob("loop_state.json"))
    assert [json.loads(p.read_text())["step"] for p in checkpoints] == [1]  # nothing was saved of step 2
    assert not list((out / "checkpoints").rglob("model"))


def test_lora_exports_adapter_and_merged_model(ray_local, tmp_path, data_dir):
    result, rows = train(
        tmp_path,
        data_dir,
        "method=lora",
        "lora.r=4",
        "train.max_steps=8",
        "train.lr=0.01",
        "train.checkpoint_every=4",
        "train.gradient_checkpointing=true",
        kill_at_step=6,
    )
    # checkpoints leave the frozen base weights out, and a resume still restores the adapters
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [4]
    final = result.summary["final_metrics"]
    assert final["trainable_params"] < final["total_params"] / 5
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    _, model = generates(tmp_path / "out" / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_pretrained_local_model_and_mixing(ray_local, tmp_path, data_dir):
    from chatforge.train.model import build_model, load_tokenizer

    base_spec = load_spec(None, TINY_TRAINING).model
    texts = [m["content"] for m in json.loads(json.dumps([{"content": "hello garden river"}] * 10))]
    tokenizer = load_tokenizer(base_spec, texts * 20)
    model = build_model(base_spec, tokenizer)
    pretrained = tmp_path / "pretrained"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    other = write_curated(tmp_path / "other", n_train=80, n_val=16, seed=5, fingerprint="fp-other")
    data = (
        f"train.data=[{{path: '{data_dir}', weight: 1.0, tag: chat}}, {{path: '{other}', weight: 1.0, tag: support}}]"
    )
    spec = load_spec(
        None,
        [
            *TINY_TRAINING,
            data,
            f"model.name_or_path={pretrained}",
            f"train.output={tmp_path / 'out'}",
            "train.max_steps=6",
            "deepspeed.zero_stage=3",  # a pretrained model loads straight into ZeRO-3 partitions
            "train.gradient_checkpointing=true",  # recomputation under ZeRO-3's gather hooks
        ],
    )
    result = run_training(spec)
    final = result.summary["final_metrics"]
    assert {"eval_loss/chat", "eval_loss/support"} <= set(final)
    datasets = result.summary["data"]["datasets"]
    assert datasets[0]["sampled_fraction"] == pytest.approx(0.5) and datasets[1]["sampled_fraction"] == 1.0
    assert result.summary["data_fingerprints"] == ["fp-test", "fp-other"]
    generates(tmp_path / "out" / "model")


# Early stopping whose only improvement is the first eval, at step 2 (every later one misses the huge min_delta).
BEST_AT_STEP_2 = (
    "train.lr=0.01",
    "train.warmup_steps=0",
    "train.schedule=constant",
    "train.max_steps=40",
    "train.eval_every=2",
    "train.early_stopping_min_delta=1000",
)


def exported_norm(tmp_path) -> float:
    """L2 norm of the exported model's weights (it must also load and generate)."""
    _, model = generates(tmp_path / "out" / "model")
    return sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()) ** 0.5


@pytest.mark.parametrize("stage", [2, 3])
def test_early_stopping_exports_the_best_weights(ray_local, tmp_path, data_dir, stage):
    result, rows = train(
        tmp_path, data_dir, f"deepspeed.zero_stage={stage}", *BEST_AT_STEP_2, "train.early_stopping_patience=2"
    )
    final = result.summary["final_metrics"]
    assert final["stopped_early"] is True
    assert final["step"] == 6 and final["best_step"] == 2 and final["exported_step"] == 2
    assert torch.isfinite(torch.tensor(final["eval_loss"]))
    norms = {row["step"]: row["weight_norm"] for row in rows if "weight_norm" in row}
    assert sorted(norms) == [2, 4, 6]
    assert abs(norms[6] - norms[2]) > 1e-3 * norms[2]  # the weights did move after the best eval

    assert exported_norm(tmp_path) == pytest.approx(norms[2], rel=1e-6)  # the step-2 weights went out, not step 6's


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_run_resumed_past_its_best_eval_still_exports_the_best_weights(ray_local, tmp_path, data_dir, stage):
    result, rows = train(
        tmp_path,
        data_dir,
        f"deepspeed.zero_stage={stage}",
        *BEST_AT_STEP_2,
        "train.checkpoint_every=4",
        "train.early_stopping_patience=3",
        kill_at_step=5,  # after the step-4 checkpoint, which holds the step-2 weights beside its own
    )
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [4]
    final = result.summary["final_metrics"]
    assert final["stopped_early"] is True
    assert final["step"] == 8 and final["best_step"] == 2 and final["exported_step"] == 2
    norms = {row["step"]: row["weight_norm"] for row in rows if "weight_norm" in row}
    assert abs(norms[8] - norms[2]) > 1e-3 * norms[2]
    assert exported_norm(tmp_path) == pytest.approx(norms[2], rel=1e-6)
