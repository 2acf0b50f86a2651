import math
import os
import shutil

import pyarrow as pa
import pytest

from chatforge.config import DeepSpeedSpec, TrainLoopSpec, load_spec
from chatforge.data.augment import with_tag
from chatforge.train.data import PackRows, TokenizeSamples, TrainDataError, resolve_data_dir
from chatforge.train.deepspeed import deepspeed_config, lr_multiplier, zero_memory_per_worker
from chatforge.train.loop import model_flops_per_token
from chatforge.train.trainer import export_dirs


def test_lr_schedules():
    loop = TrainLoopSpec(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, loop) == pytest.approx(0.1)
    assert lr_multiplier(9, loop) == pytest.approx(1.0)
    assert lr_multiplier(10, loop) == pytest.approx(1.0)
    assert lr_multiplier(60, loop) == pytest.approx(0.55)  # cosine half way: floor + (1 - floor) / 2
    assert lr_multiplier(110, loop) == pytest.approx(0.1)
    linear = loop.model_copy(update={"schedule": "linear"})
    assert lr_multiplier(60, linear) == pytest.approx(0.55) and lr_multiplier(35, linear) == pytest.approx(0.775)
    constant = loop.model_copy(update={"schedule": "constant"})
    assert lr_multiplier(100, constant) == 1.0
    values = [lr_multiplier(s, loop) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_deepspeed_config_follows_the_spec():
    loop = TrainLoopSpec(batch_size=4, grad_accum=3, max_grad_norm=0.5, lr=1e-4)
    cpu = deepspeed_config(DeepSpeedSpec(zero_stage=3, offload_optimizer=True, offload_params=True), loop, False, False)
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_force_ds_cpu_optimizer"] is False
    assert (cpu["train_micro_batch_size_per_gpu"], cpu["gradient_accumulation_steps"]) == (4, 3)
    assert cpu["gradient_clipping"] == 0.5 and cpu["bf16"]["enabled"] is False
    gpu = deepspeed_config(
        DeepSpeedSpec(zero_stage=2, extra={"zero_optimization": {"reduce_bucket_size": 5}}), loop, True, True
    )
    assert "torch_adam" not in gpu["optimizer"]["params"] and gpu["bf16"]["enabled"] is True
    assert gpu["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5,
    }


def test_offload_params_needs_zero3():
    with pytest.raises(Exception, match="zero_stage=3"):
        load_spec(None, ["deepspeed.offload_params=true", "deepspeed.zero_stage=2"])


def test_zero_memory_arithmetic():
    params = 1_000_000_000
    zero0 = zero_memory_per_worker(params, params, 0, 8, bf16=True)
    assert zero0["total"] == 16 * params  # 2 weights + 2 grads + 12 Adam/master
    zero3 = zero_memory_per_worker(params, params, 3, 8, bf16=True)
    assert zero3["total"] == 16 * params / 8
    zero2 = zero_memory_per_worker(params, params, 2, 8, bf16=True)
    assert zero2["weights"] == 2 * params and zero2["gradients"] == 2 * params / 8
    assert math.isclose(zero_memory_per_worker(params, 0, 0, 8, bf16=True)["total"], 2 * params)


def test_with_tag():
    msgs = [{"role": "user", "content": "a"}]
    assert with_tag(msgs, None) is msgs
    assert with_tag(msgs, "law")[0] == {"role": "system", "content": "[law]"}
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert with_tag(sys_msgs, "law")[0]["content"] == "[law] Be brief."
    assert with_tag([{"role": "system", "content": ""}, *msgs], "law")[0]["content"] == "[law]"
    assert with_tag(sys_msgs, "law", "<{tag}>")[0]["content"] == "<law> Be brief."


def test_training_and_curation_render_a_tag_alike():
    from chatforge.config import AugmentSpec
    from chatforge.data.augment import condition
    from chatforge.train.model import train_tokenizer

    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello friend"},
    ]
    curated = condition(convo, "court", AugmentSpec(tags={"court": "law"}))
    tokenizer = train_tokenizer(["hello there friend", "Be brief."] * 30, 300)
    trained = TokenizeSamples(tokenizer, 128, tag="law", domain=0)(pa.table({"messages": pa.array([convo])}))
    rendered = tokenizer.apply_chat_template(curated, tokenize=True, return_dict=False)
    assert trained.column("input_ids").to_pylist() == [list(rendered)]


def test_resolve_data_dir(tmp_path):
    (tmp_path / "out" / "data" / "train").mkdir(parents=True)
    with pytest.raises(TrainDataError, match="no val/"):
        resolve_data_dir(str(tmp_path / "out"))
    (tmp_path / "out" / "data" / "val").mkdir()
    # a curation moves its manifest into place last: without one, the data is not a finished curation's
    with pytest.raises(TrainDataError, match=r"no .*out/manifest\.json.*not a finished curation"):
        resolve_data_dir(str(tmp_path / "out" / "data"))
    (tmp_path / "out" / "manifest.json").write_text("{}")
    assert resolve_data_dir(str(tmp_path / "out")) == str(tmp_path / "out" / "data")
    assert resolve_data_dir(str(tmp_path / "out" / "data")) == str(tmp_path / "out" / "data")


def make_export(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_export_replaces_model_and_adapter_dirs_whole(tmp_path):
    output, checkpoint = tmp_path / "out", tmp_path / "ckpt"
    make_export(output, {"model/model.safetensors": "old", "model/stale.bin": "old", "adapter/a.safetensors": "old"})
    make_export(checkpoint, {"model/model.safetensors": "new", "model/config.json": "{}"})
    export_dirs(str(checkpoint), str(output), ("model", "adapter"))
    assert sorted(os.listdir(output / "model")) == ["config.json", "model.safetensors"]
    assert (output / "model" / "model.safetensors").read_text() == "new"
    assert sorted(os.listdir(output)) == ["model"]  # the old adapter is not left beside a full model


def test_a_failed_export_keeps_the_previous_model(tmp_path, monkeypatch):
    output, checkpoint = tmp_path / "out", tmp_path / "ckpt"
    make_export(output, {"model/model.safetensors": "old", "adapter/a.safetensors": "old"})
    make_export(checkpoint, {"model/model.safetensors": "new", "adapter/a.safetensors": "new"})
    copy = shutil.copytree

    def disk_full(source, target, **kwargs):
        copy(source, target, **kwargs)
        if source.endswith("adapter"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_dirs(str(checkpoint), str(output), ("model", "adapter"))
    assert (output / "model" / "model.safetensors").read_text() == "old"
    assert (output / "adapter" / "a.safetensors").read_text() == "old"
    assert sorted(os.listdir(output)) == ["adapter", "model"]  # no staged copy left behind


def test_a_rename_that_fails_part_way_puts_the_previous_exports_back(tmp_path, monkeypatch):
    output, checkpoint = tmp_path / "out", tmp_path / "ckpt"
    make_export(output, {"model/model.safetensors": "old", "adapter/a.safetensors": "old"})
    make_export(checkpoint, {"model/model.safetensors": "new", "adapter/a.safetensors": "new"})
    rename, calls = os.rename, []

    def failing_rename(source, target):
        calls.append(source)
        if len(calls) == 4:  # model swapped, old adapter out: the new adapter's rename fails
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output error"):
        export_dirs(str(checkpoint), str(output), ("model", "adapter"))
    assert (output / "model" / "model.safetensors").read_text() == "old"
    assert (output / "adapter" / "a.safetensors").read_text() == "old"
    assert sorted(os.listdir(output)) == ["adapter", "model"]


def test_tokenize_and_pack_batches():
    from chatforge.train.model import train_tokenizer

    texts = ["hello there friend", "the garden is green", "rivers run to the sea"] * 30
    tokenizer = train_tokenizer(texts, 300)
    convo = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the garden is green"}]
    no_reply = [{"role": "user", "content": "hello"}]
    table = pa.table({"messages": pa.array([convo, no_reply, convo])})
    samples = TokenizeSamples(tokenizer, 64, tag="chat", domain=1)(table)
    assert samples.column("supervised").to_pylist()[1] == 0  # nothing to learn: counted and skipped later
    assert all(n > 0 for i, n in enumerate(samples.column("supervised").to_pylist()) if i != 1)
    assert samples.column("domain").to_pylist() == [1, 1, 1]
    kept = samples.filter(pa.compute.greater(samples.column("supervised"), 0))
    rows = PackRows(256, tokenizer.pad_token_id, packing=True)(kept)
    assert rows["input_ids"].shape == (1, 256)  # two short samples share one row
    assert set(rows["sequence_ids"][0]) == {-1, 0, 1}
    assert rows["n_tokens"][0] == (rows["sequence_ids"][0] >= 0).sum() and rows["domain"].tolist() == [1]
    unpacked = PackRows(256, tokenizer.pad_token_id, packing=False)(kept)
    assert unpacked["input_ids"].shape == (2, 256)


def test_data_option_is_read_from_the_right():
    from chatforge.cli.train import _split_data_option

    assert _split_data_option("runs/a/data") == ("runs/a/data", 1.0, None)
    assert _split_data_option("runs/a/data:2.5") == ("runs/a/data", 2.5, None)
    assert _split_data_option("runs/a/data:2:law") == ("runs/a/data", 2.0, "law")
    assert _split_data_option("s3://bucket/data:3:support") == ("s3://bucket/data", 3.0, "support")
    assert _split_data_option("s3://bucket/data") == ("s3://bucket/data", 1.0, None)


def test_model_flops_per_token_counts_weight_gradients_only_for_trainable_parameters():
    assert model_flops_per_token(trainable=1000, total=1000) == 6000  # full fine-tuning: the usual 6N
    assert model_flops_per_token(trainable=0, total=1000) == 4000  # frozen: forward + activation gradients
    assert model_flops_per_token(trainable=10, total=1000) == 4020  # LoRA: ~4N, not 6N
