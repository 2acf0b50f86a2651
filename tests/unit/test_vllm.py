"""The vLLM engine's parts that run without vLLM: the LLMConfig a variant becomes (validated against Ray Serve LLM's
own model), and the translations between the ingress's protocol and OpenAI chat requests and responses."""

from __future__ import annotations

import json

import pytest

from chatforge.config import VariantSpec
from chatforge.serve.engine import Chunk, Completion, SamplingParams, TokenLogprob
from chatforge.serve.replica import GenerationRequest, Rejected
from chatforge.serve.vllm import chat_body, chunk_of, completion_of, error_of, llm_config, stream_events

VARIANT = VariantSpec(
    name="main",
    model="s3://bucket/models/main",
    engine_kind="vllm",
    num_gpus=1,
    autoscaling={"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16},
    vllm={
        "accelerator_type": "A100",
        "max_model_len": 4096,
        "lora_path": "s3://bucket/adapters",
        "engine_kwargs": {"enforce_eager": True},
    },
)


def test_a_variant_becomes_an_llm_config_that_ray_serve_llm_accepts():
    config = llm_config(VARIANT)
    assert config["model_loading_config"] == {
        "model_id": "main",
        "model_source": {"bucket_uri": "s3://bucket/models/main"},
    }
    assert config["engine_kwargs"] == {
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "max_model_len": 4096,
        "enable_lora": True,
        "enforce_eager": True,
    }
    scaling = config["deployment_config"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (2, 6, 16)
    assert config["lora_config"]["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    local = llm_config(
        VARIANT.model_copy(
            update={"model": "/models/main", "vllm": VARIANT.vllm.model_copy(update={"lora_path": None})}
        )
    )
    assert local["model_loading_config"]["model_source"] == "/models/main" and "lora_config" not in local

    # Ray Serve LLM's own model of the config (importable without vLLM, unlike ray.serve.llm)
    models = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config")
    for fields in (config, local):
        validated = models.LLMConfig(**fields)
        assert validated.model_id == "main" and validated.accelerator_type == "A100"
    with pytest.raises(ValueError):
        models.LLMConfig(**{**config, "accelerator_type": "no-such-gpu"})


def test_a_generation_request_becomes_an_openai_chat_request():
    params = SamplingParams(
        max_tokens=32, temperature=0.2, top_p=0.9, seed=7, stop=("###",), logprobs=True, top_logprobs=2
    )
    request = GenerationRequest("r1", [{"role": "user", "content": "hi"}], params, timeout_s=30)
    body = chat_body("main", request, stream=True)
    assert body == {
        "model": "main",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 32,
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "seed": 7,
        "stop": ["###"],
        "logprobs": True,
        "top_logprobs": 2,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    plain = chat_body("main", GenerationRequest("r2", [], SamplingParams(max_tokens=4)), stream=False)
    assert "stream_options" not in plain and "seed" not in plain and "logprobs" not in plain


def test_responses_become_completions_chunks_and_refusals():
    response = {
        "object": "chat.completion",
        "choices": [
            {
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "length",
                "logprobs": {
                    "content": [{"token": "Hello", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -2.0}]}]
                },
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    assert completion_of(response) == Completion(
        "Hello!", "length", 9, 3, (TokenLogprob("Hello", -0.1, (("Hi", -2.0),)),)
    )
    too_long = {"object": "error", "message": "This model's maximum context length is 2048 tokens", "code": 400}
    assert completion_of(too_long) == Rejected("This model's maximum context length is 2048 tokens")
    bad = {"error": {"message": "top_logprobs must be <= 20", "code": 400, "param": "top_logprobs"}}
    assert error_of(bad) == Rejected("top_logprobs must be <= 20", param="top_logprobs", code="invalid_request_error")
    with pytest.raises(RuntimeError, match="vLLM: engine died"):
        completion_of({"object": "error", "message": "engine died", "code": 500})

    event = {
        "choices": [{"delta": {"content": "Hel"}, "finish_reason": None}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1},
    }
    last = {
        "choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    batch = [f"data: {json.dumps(event)}\n\n", f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"]
    events = stream_events(batch)
    assert events == [event, last]
    assert [chunk_of(e) for e in events] == [Chunk("Hel", (), None, 1), Chunk("lo", (), "stop", 2)]
    assert chunk_of({"choices": [], "usage": {"completion_tokens": 2}}) is None
    assert stream_events([too_long]) == [too_long]


def test_building_a_vllm_variant_without_vllm_says_what_to_install():
    from chatforge.serve.vllm import vllm_deployment

    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'chatforge\[gpu\]'"):
        vllm_deployment(VARIANT)
