"""vLLM through Ray Serve LLM as a variant's engine (``engine_kind: vllm``), behind chatforge's own ingress.

chatforge's engine (`chatforge.serve.engine`) stays the default: it runs on CPU and in tests. On GPU clusters a
variant can be served by vLLM: `llm_config` maps the variant (model dir or ``s3://`` URI, replicas and autoscaling,
GPUs, LoRA) to Ray Serve LLM's ``LLMConfig``, and ``build_llm_deployment`` makes the deployment that runs vLLM.
`VllmVariant` sits between it and the ingress and speaks the ingress's protocol (``generate`` and ``stream`` of a
`GenerationRequest`, as `chatforge.serve.replica.ModelReplica` does), translating to and from the OpenAI-shaped
requests and responses of Ray Serve LLM's ``LLMServer.chat``. So auth, the A/B router, the guard, the feedback store
and the metrics are the same whichever engine answers.

``ray.serve.llm`` cannot be imported without vLLM (the ``gpu`` extra), so it is imported only where a vLLM variant is
built or runs; the translations are plain functions of dicts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ray import serve

from chatforge.config import VariantSpec
from chatforge.serve.engine import Chunk, Completion, TokenLogprob
from chatforge.serve.replica import Accepted, Finished, GenerationRequest, Rejected

CONTEXT_ERRORS = ("maximum context length", "context length", "too long")


def model_source(model: str) -> str | dict[str, str]:
    """LLMConfig's ``model_source``: a local dir (or hub id) as it is, an object-store URI as a cloud mirror."""
    if model.startswith(("s3://", "gs://", "abfss://", "azure://")):
        return {"bucket_uri": model}
    return model


def llm_config(variant: VariantSpec) -> dict[str, Any]:
    """The variant as Ray Serve LLM's ``LLMConfig`` fields (`ray.serve.llm.LLMConfig(**llm_config(v))`)."""
    if not variant.model:
        raise ValueError(f"variant {variant.name!r}: no model to serve")
    vllm = variant.vllm
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "dtype": vllm.dtype,
    }
    if vllm.max_model_len:
        engine_kwargs["max_model_len"] = vllm.max_model_len
    if vllm.lora_path:
        engine_kwargs["enable_lora"] = True
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": variant.name, "model_source": model_source(variant.model)},
        "engine_kwargs": {**engine_kwargs, **vllm.engine_kwargs},
        "deployment_config": {
            "name": f"{variant.name}-vllm",
            "autoscaling_config": variant.autoscaling.serve_config(),
            "max_ongoing_requests": variant.max_ongoing_requests,
        },
    }
    if vllm.accelerator_type:
        config["accelerator_type"] = vllm.accelerator_type
    if vllm.lora_path:
        config["lora_config"] = {
            "dynamic_lora_loading_path": vllm.lora_path,
            "max_num_adapters_per_replica": vllm.max_loras_per_replica,
        }
    return config


# ---------------------------------------------------------------- the ingress's protocol <-> OpenAI chat


def chat_body(model: str, request: GenerationRequest, stream: bool) -> dict[str, Any]:
    """A `GenerationRequest` as an OpenAI chat completion request for ``model`` (vLLM's ChatCompletionRequest)."""
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": stream,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = params.top_logprobs
    if stream:  # token counts on every chunk: the ingress's usage and metrics
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def _logprobs(choice: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return tuple(
        TokenLogprob(
            token=item["token"],
            logprob=float(item["logprob"]),
            top=tuple((alt["token"], float(alt["logprob"])) for alt in item.get("top_logprobs") or []),
        )
        for item in content
    )


def error_of(response: dict[str, Any]) -> Rejected | None:
    """A request vLLM refused as the client's fault (a prompt over the window, a bad parameter) as `Rejected`;
    None for a response that is not an error. Other errors raise: the ingress answers them as server errors."""
    error = response.get("error") if isinstance(response.get("error"), dict) else None
    if error is None and response.get("object") != "error":
        return None
    error = error or response
    message = str(error.get("message") or "the model server refused the request")
    code = int(error.get("code") or 500)
    if code >= 500:
        raise RuntimeError(f"vLLM: {message}")
    if any(phrase in message.lower() for phrase in CONTEXT_ERRORS):
        return Rejected(message)
    return Rejected(message, param=str(error.get("param") or "messages"), code="invalid_request_error")


def completion_of(response: dict[str, Any]) -> Completion | Rejected:
    """A non-streaming ChatCompletionResponse (as a dict) as a `Completion`."""
    refused = error_of(response)
    if refused is not None:
        return refused
    choice = response["choices"][0]
    usage = response.get("usage") or {}
    return Completion(
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        logprobs=_logprobs(choice),
    )


def stream_events(items: Iterable[Any]) -> list[dict[str, Any]]:
    """The events of one batch of LLMServer's stream: SSE strings (``data: {...}\\n\\n``, several per string at
    times; ``[DONE]`` ends it) or error objects (as dicts)."""
    events = []
    for item in items:
        if isinstance(item, dict):
            events.append(item)
            continue
        for line in str(item).splitlines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data and data != "[DONE]":
                events.append(json.loads(data))
    return events


def chunk_of(event: dict[str, Any]) -> Chunk | None:
    """One stream event as a `Chunk`; None for an event without a choice (the usage-only last one)."""
    if not event.get("choices"):
        return None
    choice = event["choices"][0]
    usage = event.get("usage") or {}
    return Chunk(
        text=(choice.get("delta") or {}).get("content") or "",
        logprobs=_logprobs(choice),
        finish_reason=choice.get("finish_reason"),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _as_dict(item: Any) -> Any:
    return item.model_dump() if hasattr(item, "model_dump") else item


@serve.deployment
class VllmVariant:
    """One variant served by vLLM: the ingress's ``generate`` and ``stream``, answered by Ray Serve LLM's LLMServer
    deployment (``llm``) through its ``chat`` method."""

    def __init__(self, variant: VariantSpec, llm) -> None:
        self.name = variant.name
        self.llm = llm.options(stream=True)

    def _request(self, request: GenerationRequest, stream: bool):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return ChatCompletionRequest(**chat_body(self.name, request, stream))

    async def generate(self, request: GenerationRequest) -> Completion | Rejected:
        async for response in self.llm.chat.remote(self._request(request, stream=False)):
            return completion_of(_as_dict(response))
        raise RuntimeError("vLLM returned no response")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Any]:
        """Accepted | Rejected, then Chunks, then Finished, as `ModelReplica.stream`."""
        accepted, tokens = False, 0
        async for batch in self.llm.chat.remote(self._request(request, stream=True)):
            items = batch if isinstance(batch, list) else [batch]
            for event in stream_events(_as_dict(item) for item in items):
                refused = error_of(event)
                if refused is not None:
                    yield refused
                    return
                if not accepted:
                    accepted = True
                    yield Accepted(int((event.get("usage") or {}).get("prompt_tokens") or 0))
                chunk = chunk_of(event)
                if chunk is not None:
                    tokens = chunk.completion_tokens or tokens
                    yield chunk
        yield Finished(tokens)


def vllm_deployment(variant: VariantSpec):
    """The variant's bound deployments: `VllmVariant` over Ray Serve LLM's deployment of `llm_config`."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as error:
        raise ImportError(
            f"variant {variant.name!r} has engine_kind: vllm, which needs vLLM where the app is built and on the GPU "
            f"nodes: pip install 'chatforge[gpu]' (cluster/Dockerfile's cuda variant has it) ({error})"
        ) from None
    llm = build_llm_deployment(LLMConfig(**llm_config(variant)))
    return VllmVariant.options(
        name=variant.name,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=max(256, variant.max_ongoing_requests * variant.autoscaling.max_replicas),
        max_queued_requests=variant.max_queued_requests,
    ).bind(variant, llm)
