"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of one deployment per model variant.

``build_app(args)`` is what a Serve config file names (``import_path: chatforge.serve.app:build_app``), so
``serve run``, ``serve deploy``, a KubeRay RayService and ``chatforge serve`` all start the same thing.

A request goes: API key -> size limit -> validation -> variant (by name, else weighted and sticky per ``user`` or
API key) -> input guard -> the variant's replica (tokenize, check the window, ``@serve.batch`` into the engine) ->
output guard -> feedback store -> response naming the variant (``model`` and ``x-chatforge-variant``).
The variant deployment is ``chatforge.serve.replica.ModelReplica``.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint parameters' real types (Request)
# through Serve's ingress wrapper.
import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from chatforge.config import ServeSpec, SpecError, VariantSpec, describe_errors, load_spec
from chatforge.serve.api import (
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    FeedbackRequest,
    chunk_body,
    completion_body,
    install_error_handlers,
    models_body,
    parse_body,
    read_body,
    sse,
    unauthorized,
    usage_chunk_body,
)
from chatforge.serve.engine import SamplingParams
from chatforge.serve.replica import Finished, GenerationRequest, ModelReplica, Rejected

log = logging.getLogger("chatforge.serve")

INGRESS_NAME = "chatforge-ingress"
ROUTED_MODEL_NAMES = frozenset({"auto", "chatforge"})  # `model` values that leave the choice to the router
VARIANT_HEADER = "x-chatforge-variant"


# ---------------------------------------------------------------- the HTTP ingress

fastapi_app = FastAPI(
    title="chatforge",
    description="OpenAI-compatible chat completions served by Ray Serve, with feedback.",
    version="1",
)
install_error_handlers(fastapi_app)


class _NoMetrics:
    def __getattr__(self, _name: str):
        return lambda *args, **kwargs: None


def _guard_outcome(*verdicts) -> tuple[str, float | None]:
    scores = [v.score for v in verdicts if v is not None]
    if any(v.blocked for v in verdicts if v is not None):
        outcome = "blocked"
    elif any(v.flagged for v in verdicts if v is not None):
        outcome = "flagged"
    else:
        outcome = "pass"
    return outcome, max(scores) if scores else None


@serve.deployment
@serve.ingress(fastapi_app)
class ChatIngress:
    def __init__(self, spec: ServeSpec, models: dict[str, DeploymentHandle]) -> None:
        from chatforge.serve.auth import ApiKeys
        from chatforge.serve.feedback import FeedbackStore
        from chatforge.serve.guard import Guard
        from chatforge.serve.metrics import ServeMetrics
        from chatforge.serve.router import Router

        self.spec = spec
        self.models = models
        self.variants = {v.name: v for v in spec.variants}
        self.router = Router(spec.variants)
        self.keys = ApiKeys.from_spec(spec.auth)
        self.guard = Guard(spec.guard)
        self.store = FeedbackStore.from_spec(spec.feedback)
        self.metrics = ServeMetrics() if spec.metrics else _NoMetrics()
        self._background: set[asyncio.Task] = set()
        self.created = int(time.time())

    # ------------------------------------------------------------ helpers

    def _authorize(self, request: Request) -> str | None:
        """The API key's id (None when keys are off); 401 when keys are on and this one is missing or wrong."""
        if not self.keys.enabled:
            return None
        key_id = self.keys.verify(request.headers.get("authorization"))
        if key_id is None:
            raise unauthorized()
        return key_id

    def _choose(self, body: ChatCompletionRequest, key_id: str | None) -> str:
        requested = body.model if body.model and body.model not in ROUTED_MODEL_NAMES else None
        try:
            return self.router.choose(body.user or key_id, requested)
        except ValueError:
            raise ApiError(
                404,
                f"The model '{body.model}' does not exist; available: {', '.join(self.router.names)} "
                f"(or 'auto' to let the server choose).",
                param="model",
                code="model_not_found",
                type="not_found_error",
            ) from None

    def _params(self, body: ChatCompletionRequest, variant: str) -> SamplingParams:
        engine = self.variants[variant].engine
        asked = body.requested_max_tokens()
        if asked is not None and asked > engine.max_tokens_limit:
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise ApiError(
                400,
                f"Invalid value for '{field}': {asked} is over this model's limit of {engine.max_tokens_limit}.",
                param=field,
                code="invalid_value",
            )
        return SamplingParams(
            max_tokens=asked or engine.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_sequences(),
            seed=body.seed,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs or 0,
        )

    def _store(self, **record: Any) -> asyncio.Task:
        """Write a completion to the store off the event loop; a store outage is logged, never a failed answer."""
        from chatforge.serve.feedback import CompletionRecord

        async def write() -> None:
            try:
                await asyncio.to_thread(self.store.record_completion, CompletionRecord(**record))
            except Exception:
                log.exception("could not store completion %s", record["id"])

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ endpoints

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "variants": self.router.names}

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return models_body(self.router.names, self.created)

    @fastapi_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        from chatforge.serve.feedback import UnknownCompletion

        self._authorize(request)
        body = parse_body(FeedbackRequest, await read_body(request, self.spec.max_body_bytes))
        try:
            feedback_id = await asyncio.to_thread(
                self.store.record_feedback, body.completion_id, body.rating, body.correction, body.comment, body.user
            )
        except UnknownCompletion:
            raise ApiError(
                404,
                f"No completion with id '{body.completion_id}' (ids are the `id` of chat completion responses).",
                param="completion_id",
                code="completion_not_found",
                type="not_found_error",
            ) from None
        self.metrics.feedback(body.rating)
        return JSONResponse(
            {"id": feedback_id, "object": "feedback", "completion_id": body.completion_id, "rating": body.rating}
        )

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        variant = "none"
        try:
            key_id = self._authorize(request)
            body = parse_body(ChatCompletionRequest, await read_body(request, self.spec.max_body_bytes))
            body.validate_choices()
            if len(body.messages) > self.spec.max_messages:
                raise ApiError(
                    400,
                    f"Invalid value for 'messages': {len(body.messages)} messages, the limit is "
                    f"{self.spec.max_messages}.",
                    param="messages",
                )
            variant = self._choose(body, key_id)
            params = self._params(body, variant)
            return await self._complete(body, variant, params)
        except ApiError as error:
            self.metrics.request(variant, str(error.status))
            raise
        except Exception:
            self.metrics.request(variant, "500")
            raise

    async def _complete(self, body: ChatCompletionRequest, variant: str, params: SamplingParams):
        started = time.perf_counter()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        messages = body.plain_messages()
        headers = {VARIANT_HEADER: variant}
        record = {
            "id": completion_id,
            "created": time.time(),
            "variant": variant,
            "user": body.user,
            "prompt": json.dumps(messages, ensure_ascii=False),
            "stream": body.stream,
        }
        verdict_in = await asyncio.to_thread(self.guard.check_input, messages)
        if verdict_in.blocked:
            self.metrics.guard_block(variant, "input")
            self.metrics.request(variant, "blocked")
            await self._store(
                **record,
                answer=self.guard.refusal,
                latency_ms=(time.perf_counter() - started) * 1000,
                prompt_tokens=0,
                completion_tokens=0,
                guard="blocked",
                guard_score=verdict_in.score,
            )
            return self._refusal(body, completion_id, created, variant, headers)

        request = GenerationRequest(completion_id, messages, params)
        if body.stream:
            return await self._stream(body, request, variant, record, verdict_in, started, created, headers)

        result = await self.models[variant].generate.remote(request)
        if isinstance(result, Rejected):
            raise ApiError(400, result.message, param=result.param, code=result.code or "invalid_value")
        text, finish, logprobs = result.text, result.finish_reason, result.logprobs if params.logprobs else None
        verdict_out = await asyncio.to_thread(self.guard.check_output, text)
        if verdict_out.blocked:
            self.metrics.guard_block(variant, "output")
            text, finish, logprobs = self.guard.refusal, "content_filter", None
        latency = time.perf_counter() - started
        outcome, score = _guard_outcome(verdict_in, verdict_out)
        await self._store(
            **record,
            answer=text,
            latency_ms=latency * 1000,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            guard=outcome,
            guard_score=score,
        )
        self.metrics.request(variant, "blocked" if verdict_out.blocked else "ok")
        self.metrics.tokens(variant, result.prompt_tokens, result.completion_tokens)
        self.metrics.latency(variant, latency)
        payload = completion_body(
            completion_id, created, variant, text, finish, result.prompt_tokens, result.completion_tokens, logprobs
        )
        return JSONResponse(payload, headers=headers)

    def _refusal(self, body: ChatCompletionRequest, completion_id: str, created: int, variant: str, headers):
        refusal = self.guard.refusal
        if not body.stream:
            payload = completion_body(completion_id, created, variant, refusal, "content_filter", 0, 0)
            return JSONResponse(payload, headers=headers)

        def events():
            yield sse(chunk_body(completion_id, created, variant, {"role": "assistant", "content": ""}))
            yield sse(chunk_body(completion_id, created, variant, {"content": refusal}))
            yield sse(chunk_body(completion_id, created, variant, {}, "content_filter"))
            if body.stream_options and body.stream_options.include_usage:
                yield sse(usage_chunk_body(completion_id, created, variant, 0, 0))
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def _stream(self, body, request: GenerationRequest, variant, record, verdict_in, started, created, headers):
        responses = self.models[variant].options(stream=True).stream.remote(request)
        first = await responses.__anext__()
        if isinstance(first, Rejected):
            responses.cancel()
            raise ApiError(400, first.message, param=first.param, code=first.code or "invalid_value")
        prompt_tokens = first.prompt_tokens
        completion_id = request.request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            pieces: list[str] = []
            completion_tokens = 0
            finished = False
            try:
                yield sse(chunk_body(completion_id, created, variant, {"role": "assistant", "content": ""}))
                async for item in responses:
                    if isinstance(item, Finished):
                        completion_tokens = item.completion_tokens
                        continue
                    pieces.append(item.text)
                    logprobs = item.logprobs if request.params.logprobs else None
                    if item.text or logprobs:
                        delta = {"content": item.text}
                        yield sse(chunk_body(completion_id, created, variant, delta, None, logprobs))
                    if item.finish_reason is not None:
                        yield sse(chunk_body(completion_id, created, variant, {}, item.finish_reason))
                if include_usage:
                    yield sse(usage_chunk_body(completion_id, created, variant, prompt_tokens, completion_tokens))
                finished = True
            finally:
                # What was sent cannot be taken back: the output guard only flags a stream.
                text = "".join(pieces)
                verdict_out = await asyncio.to_thread(self.guard.check_output, text) if finished else None
                outcome, score = _guard_outcome(verdict_in, verdict_out)
                outcome = "flagged" if outcome == "blocked" else outcome
                latency = time.perf_counter() - started
                store = self._store(
                    **record,
                    answer=text,
                    latency_ms=latency * 1000,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    guard=outcome,
                    guard_score=score,
                )
                self.metrics.request(variant, "ok" if finished else "disconnected")
                self.metrics.tokens(variant, prompt_tokens, completion_tokens)
                self.metrics.latency(variant, latency)
                if not finished:
                    responses.cancel()
            await store  # stored before [DONE], so feedback sent right after the stream finds the completion
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------- building the application


def _resolve_path(path: str | None, what: str) -> str:
    if not path:
        raise SpecError(f"{what}: no model dir given (set `model:` or pass --model)")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = Path.cwd() / resolved
    if not (resolved / "config.json").is_file():
        raise SpecError(
            f"{what}: {resolved} is not an exported model dir (no config.json); point it at `chatforge train`'s "
            "OUTPUT/model (relative paths are taken from the directory Serve was started in)"
        )
    return str(resolved)


def _absolute_sqlite(url: str) -> str:
    """``sqlite:///relative.db`` -> an absolute path, so every replica writes the same file whatever its cwd."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path.cwd() / url[len(prefix) :])
    return url


def _serve_host(spec: ServeSpec) -> str:
    """The host Serve's HTTP proxy binds (a config file's http_options), else the spec's."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            return ray.get(client._controller.get_http_config.remote(), timeout=10).host
    except Exception:  # no Serve running yet (chatforge serve checks before starting it)
        pass
    return spec.host


def load_serve_spec(args: dict[str, Any]) -> ServeSpec:
    """``{"spec": path, "overrides": [...]}`` (the `serve` section of a chatforge spec) or ServeSpec fields."""
    args = dict(args or {})
    if "spec" in args:
        unknown = set(args) - {"spec", "overrides"}
        if unknown:
            raise SpecError(f"build_app args: with `spec`, only `overrides` is allowed; unknown: {sorted(unknown)}")
        return load_spec(args["spec"], list(args.get("overrides") or [])).serve
    try:
        return ServeSpec.model_validate(args)
    except ValidationError as error:
        raise SpecError(describe_errors(error, "build_app args (the ServeSpec fields)")) from None


def prepare_spec(spec: ServeSpec) -> ServeSpec:
    """Model dirs and SQLite paths made absolute (replicas may run elsewhere), checked to exist."""
    variants = [
        v.model_copy(update={"model": _resolve_path(v.model, f"serve.variants[{i}] ({v.name}).model")})
        for i, v in enumerate(spec.variants)
    ]
    if INGRESS_NAME in {v.name for v in variants}:
        raise SpecError(f"serve.variants: the name {INGRESS_NAME!r} is taken by the HTTP ingress")
    feedback = spec.feedback.model_copy(update={"url": _absolute_sqlite(spec.feedback.url)})
    return spec.model_copy(update={"variants": variants, "feedback": feedback})


def variant_deployment(variant: VariantSpec):
    scaling = variant.autoscaling
    return ModelReplica.options(
        name=variant.name,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
            "metrics_interval_s": scaling.metrics_interval_s,
        },
        ray_actor_options={"num_cpus": variant.num_cpus, "num_gpus": variant.num_gpus},
        max_ongoing_requests=variant.max_ongoing_requests,
    ).bind(variant)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for a ServeSpec given as ``args`` (see ``load_serve_spec``)."""
    from chatforge.serve.auth import ApiKeys, check_bind

    spec = prepare_spec(load_serve_spec(args))
    try:
        check_bind(_serve_host(spec), ApiKeys.from_spec(spec.auth))
    except ValueError as error:
        raise SpecError(str(error)) from None
    models = {variant.name: variant_deployment(variant) for variant in spec.variants}
    return ChatIngress.options(
        name=INGRESS_NAME,
        num_replicas=spec.ingress_replicas,
        ray_actor_options={"num_cpus": spec.ingress_num_cpus},
        max_ongoing_requests=max(256, sum(v.max_ongoing_requests for v in spec.variants)),
    ).bind(spec, models)
