"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of one deployment per model variant.

``build_app(args)`` is what a Serve config file names (``import_path: chatforge.serve.app:build_app``), so
``serve run``, ``serve deploy``, a KubeRay RayService and ``chatforge serve`` all start the same thing.

A request goes: API key -> size limit -> validation -> variant (by name, else weighted and sticky per ``user`` or
API key) -> input guard -> the variant's replica (tokenize, check the window, ``@serve.batch`` into the engine) ->
output guard -> the feedback store's write queue -> response naming the variant (``model`` and
``x-chatforge-variant``).
The variant deployment is ``chatforge.serve.replica.ModelReplica``. Every completion has a deadline
(``request_timeout_s``) and each variant a bounded queue, so overload and stalls are 503s with OpenAI bodies; a
client that leaves cancels its generation.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint parameters' real types (Request)
# through Serve's ingress wrapper.
import asyncio
import hashlib
import json
import logging
import os
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from chatforge.config import (
    FeedbackSpec,
    ServeSpec,
    SpecError,
    VariantSpec,
    describe_errors,
    load_spec,
    sqlite_replicas_error,
)
from chatforge.serve.api import (
    RETRY_AFTER_S,
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    FeedbackRequest,
    already_rated,
    chunk_body,
    completion_body,
    completion_not_found,
    install_error_handlers,
    models_body,
    overloaded,
    parse_body,
    read_body,
    sse,
    store_unavailable,
    timed_out,
    unauthorized,
    unavailable,
    usage_chunk_body,
)
from chatforge.serve.engine import SamplingParams
from chatforge.serve.replica import Finished, GenerationRequest, ModelReplica, Rejected

log = logging.getLogger("chatforge.serve")

INGRESS_NAME = "chatforge-ingress"
ROUTED_MODEL_NAMES = frozenset({"auto", "chatforge"})  # `model` values that leave the choice to the router
VARIANT_HEADER = "x-chatforge-variant"
# What a stopping ingress replica waits for its queued store writes: inside Serve's graceful_shutdown_timeout_s (20).
STORE_DRAIN_TIMEOUT_S = 15.0
# The human evaluation pages load nothing from anywhere (inline CSS, no script) and post only to this server.
UI_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
T = TypeVar("T")


# ---------------------------------------------------------------- the HTTP ingress

# FastAPI's own /docs, /redoc and /openapi.json would answer anyone: the ingress serves them behind the API's keys.
fastapi_app = FastAPI(
    title="chatforge",
    description="OpenAI-compatible chat completions served by Ray Serve, with feedback.",
    version="1",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
install_error_handlers(fastapi_app)


async def until(deadline: float, work: Awaitable[T], cancel: Callable[[], None], timeout_s: float) -> T:
    """``await work`` by the event-loop time ``deadline``.

    At the deadline, or when this request is itself cancelled (Serve cancels it when the client disconnects),
    ``cancel()`` stops the work downstream, so no replica keeps generating for nobody. A full queue, a variant
    without replicas and the deadline become 503s with OpenAI bodies rather than Serve's plain-text errors."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        cancel()
        raise timed_out(timeout_s) from None
    except asyncio.CancelledError:
        cancel()
        raise
    except BackPressureError:
        raise overloaded() from None
    except DeploymentUnavailableError:
        raise unavailable() from None


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
    def __init__(
        self,
        spec: ServeSpec,
        models: dict[str, DeploymentHandle],
        key_digests: list[str],
        user_hash_key: str | None = None,
        eval_prompts: list[str] | None = None,
    ) -> None:
        """``key_digests``: the API keys' SHA-256 hex digests, read where ``build_app`` ran (see auth.py);
        ``user_hash_key``: hex of the key the store hashes ``user`` with, the same for every replica (None: one
        of this replica's own); ``eval_prompts``: the prompts the human evaluation page shows raters."""
        from chatforge.compat import serve_http_host
        from chatforge.serve.auth import ApiKeys, check_access
        from chatforge.serve.feedback import FeedbackStore
        from chatforge.serve.guard import Guard
        from chatforge.serve.metrics import ServeMetrics
        from chatforge.serve.router import Router
        from chatforge.serve.writer import StoreWriter

        self.keys = ApiKeys.from_hex(key_digests)
        if not self.keys.enabled:  # checked here, in the serving process, whatever the builder checked
            check_access(self.keys, spec.auth.anonymous, serve_http_host())
        self.spec = spec
        self.models = models
        self.variants = {v.name: v for v in spec.variants}
        self.router = Router(spec.variants)
        self.guard = Guard(spec.guard)
        self.metrics = ServeMetrics() if spec.metrics else _NoMetrics()
        # The URL as this replica sees it (url_env is read here): checked again, whatever the builder checked.
        error = sqlite_replicas_error(spec.feedback.resolved_url(), spec.ingress_replicas, spec.feedback.url_env)
        if error:
            raise ValueError(error)
        # Nothing connects here: a database that is down at start delays writes, not the API (see StoreWriter).
        self.store = FeedbackStore.from_spec(
            spec.feedback, user_hash_key=bytes.fromhex(user_hash_key) if user_hash_key else None
        )
        self.writer = StoreWriter(
            self.store,
            self.metrics,
            queue_size=spec.feedback.queue_size,
            retry_window_s=spec.feedback.retry_window_s,
            peers=spec.ingress_replicas > 1,
        )
        self.writer.start()
        self.created = int(time.time())
        self.eval_prompts = list(eval_prompts or [])

    def reconfigure(self, config: dict[str, Any]) -> None:
        """The deployment's ``user_config``: ``{"weights": {variant: weight}}`` sets the A/B traffic split. Serve
        calls this at start and on every change of the user_config alone, without restarting the replica, so a
        canary's share moves with no request lost (`serve deploy` of a config file whose only change is the
        ingress's user_config)."""
        from chatforge.serve.router import Router, reweighted

        weights = (config or {}).get("weights") or {}
        self.router = Router(reweighted(self.spec.variants, weights))
        log.info("traffic weights: %s", dict(zip(self.router.names, self.router.weights)))

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: the queued writes go to the store first, if it answers."""
        writer = getattr(self, "writer", None)  # absent when __init__ failed
        if writer is not None:
            await writer.close(STORE_DRAIN_TIMEOUT_S)
            self.store.dispose()

    # ------------------------------------------------------------ helpers

    def _authorize(self, request: Request) -> str | None:
        """The API key's id (None when anonymous); 401 when the key is missing or wrong, or, anonymous, when the
        client is not on this machine (a proxy on another node, or a bind that changed since the start check)."""
        from chatforge.serve.auth import is_local_client

        if not self.keys.enabled:
            if not is_local_client(request.client.host if request.client else None):
                raise unauthorized()
            return None
        key_id = self.keys.verify(request.headers.get("authorization"))
        if key_id is None:
            raise unauthorized()
        return key_id

    def _docs(self, request: Request) -> None:
        if not self.spec.docs:
            raise ApiError(404, "Not Found", type="not_found_error")
        self._authorize(request)

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

    def _model_messages(self, variant: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """What the variant's model is given: the client's messages, with the variant's training tag at the head of
        the system prompt (`with_tag`, as training rendered it). The store and the guard keep what the client sent."""
        from chatforge.data.augment import with_tag

        return with_tag(messages, self.variants[variant].tag)

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

    def _store(self, **record: Any) -> None:
        """Queue a completion for the store. Never waits, so it runs even in a cancelled stream's cleanup."""
        from chatforge.serve.feedback import CompletionRecord

        self.writer.add_completion(CompletionRecord(**record))

    # ------------------------------------------------------------ endpoints

    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request) -> dict:
        """ "ok" to anyone (load balancers and probes have no key: a store outage must not take the API out of
        rotation); the variants and the feedback store's state only to a caller with a key."""
        if self.keys.enabled and self.keys.verify(request.headers.get("authorization")) is not None:
            return {"status": "ok", "variants": self.router.names, "store": self.writer.health()}
        return {"status": "ok"}

    @fastapi_app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._docs(request)
        return JSONResponse(request.app.openapi())

    @fastapi_app.get("/docs", include_in_schema=False)
    async def swagger_ui(self, request: Request) -> HTMLResponse:
        self._docs(request)
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="chatforge")

    @fastapi_app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._docs(request)
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="chatforge")

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return models_body(self.router.names, self.created)

    @fastapi_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        """One rating per completion and API key, from the key that asked for the completion; queued for the store
        (see StoreWriter), so the answer waits for no database write."""
        from chatforge.serve.feedback import AlreadyRated, StoreBusy, StoreUnavailable, UnknownCompletion

        key_id = self._authorize(request)
        body = parse_body(FeedbackRequest, await read_body(request, self.spec.max_body_bytes))
        body.check_lengths(self.spec.feedback.max_correction_chars, self.spec.feedback.max_comment_chars)
        try:
            feedback_id = await self.writer.rate(
                body.completion_id, key_id, body.rating, body.correction, body.comment, body.user
            )
        except UnknownCompletion:
            raise completion_not_found(body.completion_id) from None
        except AlreadyRated:
            raise already_rated(body.completion_id) from None
        except (StoreUnavailable, StoreBusy) as error:
            raise store_unavailable(str(error)) from None
        self.metrics.feedback(body.rating)
        return JSONResponse(
            {"id": feedback_id, "object": "feedback", "completion_id": body.completion_id, "rating": body.rating}
        )

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        deadline = asyncio.get_running_loop().time() + self.spec.request_timeout_s
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
            return await self._complete(body, variant, params, deadline, key_id)
        except ApiError as error:
            self.metrics.request(variant, str(error.status))
            raise
        except asyncio.CancelledError:  # the client went away (`until` has cancelled the generation)
            self.metrics.request(variant, "disconnected")
            raise
        except Exception:
            self.metrics.request(variant, "500")
            raise

    async def _complete(
        self, body: ChatCompletionRequest, variant: str, params: SamplingParams, deadline: float, key_id: str | None
    ):
        started = time.perf_counter()
        messages = body.plain_messages()
        headers = {VARIANT_HEADER: variant}
        record = self._record(variant, messages, body.user, body.stream, key_id)
        completion_id, created = record["id"], int(record["created"])
        verdict_in = await self._check_input(record, messages, started)
        if verdict_in.blocked:
            return self._refusal(body, completion_id, created, variant, headers)
        left = deadline - asyncio.get_running_loop().time()
        request = GenerationRequest(
            completion_id, self._model_messages(variant, messages), params, timeout_s=max(left, 0.001)
        )
        if body.stream:
            return await self._stream(body, request, variant, record, verdict_in, started, created, headers, deadline)
        text, finish, logprobs, result = await self._generate(record, request, verdict_in, started, deadline)
        payload = completion_body(
            completion_id, created, variant, text, finish, result.prompt_tokens, result.completion_tokens, logprobs
        )
        return JSONResponse(payload, headers=headers)

    @staticmethod
    def _record(variant: str, messages: list[dict], user: str | None, stream: bool, key_id: str | None) -> dict:
        """The store's record of a new completion, less what its answer decides."""
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": time.time(),
            "variant": variant,
            "user": user,
            "prompt": json.dumps(messages, ensure_ascii=False),
            "stream": stream,
            "key_id": key_id,
        }

    async def _check_input(self, record: dict, messages: list[dict], started: float):
        """The input guard's verdict; a blocked prompt's refusal is stored and counted here."""
        verdict = await asyncio.to_thread(self.guard.check_input, messages)
        if verdict.blocked:
            variant = record["variant"]
            self.metrics.guard_block(variant, "input")
            self.metrics.request(variant, "blocked")
            self._store(
                **record,
                answer=self.guard.refusal,
                latency_ms=(time.perf_counter() - started) * 1000,
                prompt_tokens=0,
                completion_tokens=0,
                guard="blocked",
                guard_score=verdict.score,
            )
        return verdict

    async def _generate(self, record: dict, request: GenerationRequest, verdict_in, started: float, deadline: float):
        """One whole answer from the record's variant, through the output guard, stored and counted:
        (text, finish reason, logprobs or None, the replica's result)."""
        variant = record["variant"]
        call = self.models[variant].generate.remote(request)
        result = await until(deadline, call, call.cancel, self.spec.request_timeout_s)
        if isinstance(result, Rejected):
            raise ApiError(400, result.message, param=result.param, code=result.code or "invalid_value")
        text, finish = result.text, result.finish_reason
        logprobs = result.logprobs if request.params.logprobs else None
        verdict_out = await asyncio.to_thread(self.guard.check_output, text)
        if verdict_out.blocked:
            self.metrics.guard_block(variant, "output")
            text, finish, logprobs = self.guard.refusal, "content_filter", None
        latency = time.perf_counter() - started
        outcome, score = _guard_outcome(verdict_in, verdict_out)
        self._store(
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
        return text, finish, logprobs, result

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

    async def _stream(
        self, body, request: GenerationRequest, variant, record, verdict_in, started, created, headers, deadline
    ):
        from chatforge.serve.guard import StreamGuard

        responses = self.models[variant].options(stream=True).stream.remote(request)
        first = await until(deadline, responses.__anext__(), responses.cancel, self.spec.request_timeout_s)
        if isinstance(first, Rejected):
            responses.cancel()
            raise ApiError(400, first.message, param=first.param, code=first.code or "invalid_value")
        prompt_tokens = first.prompt_tokens
        completion_id = request.request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # Under `block`, text is sent only once scored; under `flag` the whole answer is scored when it ends.
        censor = StreamGuard(self.guard, self.spec.guard.stream_window_chars) if self.guard.blocks_output else None

        def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
            return sse(chunk_body(completion_id, created, variant, delta, finish, logprobs))

        async def events():
            sent: list[str] = []  # the text the client received
            completion_tokens = 0  # of the last chunk received: a stream cut by the client counts what it generated
            ending = None  # ok, blocked, timeout or error; None when the client left first
            verdict_out = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while ending is None:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await responses.__anext__()
                    except StopAsyncIteration:
                        ending = "ok"
                        continue
                    except TimeoutError:
                        responses.cancel()
                        ending = "timeout"
                        yield sse(timed_out(self.spec.request_timeout_s).body())  # OpenAI clients raise on it
                        continue
                    except Exception:
                        log.exception("stream %s failed", completion_id)
                        responses.cancel()
                        ending = "error"
                        yield sse(
                            ApiError(500, "The server had an error while generating.", type="server_error").body()
                        )
                        continue
                    if isinstance(item, Finished):
                        completion_tokens = item.completion_tokens
                        continue
                    completion_tokens = item.completion_tokens
                    text, logprobs = item.text, item.logprobs if request.params.logprobs else None
                    if censor is not None:
                        censor.add(text, logprobs or ())
                        if item.finish_reason is None and not censor.due():
                            continue
                        released = await asyncio.to_thread(censor.release, item.finish_reason is not None)
                        if released is None:
                            responses.cancel()
                            ending = "blocked"
                            sent.append(self.guard.refusal)
                            yield chunk({"content": self.guard.refusal})
                            yield chunk({}, "content_filter")
                            continue
                        text, logprobs = released[0], (released[1] if logprobs is not None else None)
                    sent.append(text)
                    if text or logprobs:
                        yield chunk({"content": text}, None, logprobs)
                    if item.finish_reason is not None:
                        yield chunk({}, item.finish_reason)
                if censor is None and ending == "ok":
                    verdict_out = await asyncio.to_thread(self.guard.check_output, "".join(sent))
                if include_usage and ending in ("ok", "blocked"):
                    yield sse(usage_chunk_body(completion_id, created, variant, prompt_tokens, completion_tokens))
            finally:
                # Nothing here awaits: a client that leaves cancels this generator, and the record must still go.
                if censor is not None:
                    verdict_out = censor.worst
                outcome, score = _guard_outcome(verdict_in, verdict_out)
                latency = time.perf_counter() - started
                self._store(
                    **record,
                    answer="".join(sent),
                    latency_ms=latency * 1000,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    guard=outcome,
                    guard_score=score,
                )
                if ending == "blocked":
                    self.metrics.guard_block(variant, "output")
                self.metrics.request(
                    variant, {"timeout": "503", "error": "500", None: "disconnected"}.get(ending, ending)
                )
                self.metrics.tokens(variant, prompt_tokens, completion_tokens)
                self.metrics.latency(variant, latency)
                if ending is None:
                    responses.cancel()
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # ------------------------------------------------------------ the human evaluation pages (chatforge.serve.ui)

    def _ui_url(self, request: Request, page: str) -> str:
        return f"{request.scope.get('root_path', '')}/ui/{page}"

    def _page(self, page: str, status: int = 200, **context) -> HTMLResponse:
        from chatforge.serve.ui import render

        context = {"signed_in": self.keys.enabled, "max_prompt_chars": self.spec.human_eval.max_prompt_chars, **context}
        return HTMLResponse(render(page, **context), status_code=status, headers=UI_HEADERS)

    def _rater(self, request: Request) -> str | None:
        """The rater's API key id (None: served without keys) from a bearer header or the sign-in cookie; ApiError
        401 without a valid one, 404 when the pages are off."""
        from chatforge.serve.ui import KEY_COOKIE

        if not self.spec.human_eval.enabled:
            raise ApiError(404, "Not Found", type="not_found_error")
        cookie = request.cookies.get(KEY_COOKIE)
        if self.keys.enabled and cookie and "authorization" not in request.headers:
            key_id = self.keys.verify(f"Bearer {cookie}")
            if key_id is None:
                raise unauthorized()
            return key_id
        return self._authorize(request)

    def _sign_in(self, request: Request, error: ApiError, message: str | None = None) -> HTMLResponse:
        if error.status != 401:
            raise error
        if not self.keys.enabled:  # anonymous serving answers this machine only
            return self._page("login", 401, error="This server takes no API keys and answers its own machine only.")
        return self._page("login", 401, error=message)

    async def _pair(self, prompt: str, key_id: str | None):
        """Two variants' answers to ``prompt``, in random order, both stored as completions of ``key_id``."""
        from chatforge.serve.ui import Pair

        names = self.spec.human_eval.variants or list(self.variants)
        if len(names) < 2:
            raise ApiError(409, f"Comparing needs two variants; this server has one ({names[0]}).")
        first, second = random.sample(names, 2)
        messages = [{"role": "user", "content": prompt}]
        deadline = asyncio.get_running_loop().time() + self.spec.request_timeout_s
        (first_id, first_text), (second_id, second_text) = await asyncio.gather(
            self._answer(messages, first, key_id, deadline), self._answer(messages, second, key_id, deadline)
        )
        return Pair(prompt, first_id, first_text, second_id, second_text)

    async def _answer(self, messages: list[dict], variant: str, key_id: str | None, deadline: float):
        """(completion id, text) of one whole answer, guarded and stored like an API completion."""
        started = time.perf_counter()
        record = self._record(variant, messages, None, False, key_id)
        verdict_in = await self._check_input(record, messages, started)
        if verdict_in.blocked:
            return record["id"], self.guard.refusal
        engine = self.variants[variant].engine
        params = SamplingParams(max_tokens=engine.default_max_tokens)
        left = deadline - asyncio.get_running_loop().time()
        request = GenerationRequest(
            record["id"], self._model_messages(variant, messages), params, timeout_s=max(left, 0.001)
        )
        text, *_ = await self._generate(record, request, verdict_in, started, deadline)
        return record["id"], text

    @fastapi_app.get("/ui", include_in_schema=False)
    async def ui_home(self, request: Request) -> RedirectResponse:
        return RedirectResponse(self._ui_url(request, "compare"), status_code=303)

    @fastapi_app.get("/ui/login", include_in_schema=False)
    async def ui_login_form(self, request: Request) -> HTMLResponse:
        if not self.spec.human_eval.enabled:
            raise ApiError(404, "Not Found", type="not_found_error")
        return self._page("login", signed_in=False)

    @fastapi_app.post("/ui/login", include_in_schema=False)
    async def ui_login(self, request: Request):
        from chatforge.serve.ui import KEY_COOKIE, parse_form

        if not self.spec.human_eval.enabled:
            raise ApiError(404, "Not Found", type="not_found_error")
        try:
            key = parse_form(await read_body(request, self.spec.max_body_bytes)).get("key", "").strip()
        except ValueError:
            key = ""
        if not self.keys.enabled:
            return RedirectResponse(self._ui_url(request, "compare"), status_code=303)
        if not key or self.keys.verify(f"Bearer {key}") is None:
            return self._page("login", 401, signed_in=False, error="That key is not one of this server's API keys.")
        response = RedirectResponse(self._ui_url(request, "compare"), status_code=303, headers=UI_HEADERS)
        response.set_cookie(
            KEY_COOKIE,
            key,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=self._ui_url(request, ""),
        )
        return response

    @fastapi_app.post("/ui/logout", include_in_schema=False)
    async def ui_logout(self, request: Request) -> RedirectResponse:
        from chatforge.serve.ui import KEY_COOKIE

        response = RedirectResponse(self._ui_url(request, "login"), status_code=303, headers=UI_HEADERS)
        response.delete_cookie(KEY_COOKIE, path=self._ui_url(request, ""))
        return response

    @fastapi_app.get("/ui/compare", include_in_schema=False)
    async def ui_compare(self, request: Request) -> HTMLResponse:
        try:
            key_id = self._rater(request)
        except ApiError as error:
            return self._sign_in(request, error)
        own = request.query_params.get("prompt", "").strip()
        limit = self.spec.human_eval.max_prompt_chars
        if len(own) > limit:
            return self._page("compare", 400, error=f"The prompt has {len(own)} characters; the limit is {limit}.")
        prompt = own or (random.choice(self.eval_prompts) if self.eval_prompts else "")
        if not prompt:
            return self._page("compare", error="No prompts are configured (serve.human_eval.prompts): ask your own.")
        try:
            pair = await self._pair(prompt, key_id)
        except ApiError as error:
            return self._page("compare", error.status, error=error.message)
        return self._page("compare", pair=pair, saved=request.query_params.get("saved") == "1")

    @fastapi_app.post("/ui/compare", include_in_schema=False)
    async def ui_vote(self, request: Request):
        from chatforge.serve.feedback import AlreadyRated, StoreBusy, StoreUnavailable, UnknownCompletion
        from chatforge.serve.ui import comparison_from_form, parse_form

        try:
            key_id = self._rater(request)
        except ApiError as error:
            return self._sign_in(request, error, "Sign in again: your vote was not saved.")
        try:
            comparison = comparison_from_form(parse_form(await read_body(request, self.spec.max_body_bytes)))
            await self.writer.compare(comparison, key_id)
        except AlreadyRated:  # before ValueError, which it is
            return self._page("compare", 409, error="These two answers were rated already.")
        except UnknownCompletion:
            return self._page("compare", 404, error="The vote was not saved: those answers are not yours to rate.")
        except ValueError as error:
            return self._page("compare", 400, error=f"The vote was not saved: {error}.")
        except (StoreUnavailable, StoreBusy) as error:
            return self._page("compare", 503, error=f"The vote was not saved: {error}")
        return RedirectResponse(f"{self._ui_url(request, 'compare')}?saved=1", status_code=303, headers=UI_HEADERS)

    async def _results(self, request: Request):
        from chatforge.serve.ui import pair_results

        self._rater(request)
        votes = await asyncio.to_thread(self.store.comparison_votes)
        return pair_results(votes), len(votes)

    @fastapi_app.get("/ui/results", include_in_schema=False)
    async def ui_results(self, request: Request) -> HTMLResponse:
        try:
            pairs, total = await self._results(request)
        except ApiError as error:
            return self._sign_in(request, error)
        return self._page("results", pairs=pairs, total=total)

    @fastapi_app.get("/ui/results.json", include_in_schema=False)
    async def ui_results_json(self, request: Request) -> JSONResponse:
        pairs, total = await self._results(request)
        return JSONResponse({"votes": total, "pairs": [pair.as_dict() for pair in pairs]})


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
    # The engine loads safetensors only: one file, or an index of shards (transformers' two names for them).
    if not any((resolved / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise SpecError(
            f"{what}: {resolved} has a config.json but no weights (model.safetensors or model.safetensors.index.json): "
            "an export that did not finish? Point it at a complete `chatforge train` OUTPUT/model, or train again"
        )
    return str(resolved)


def _absolute_sqlite(url: str) -> str:
    """``sqlite:///relative.db`` -> an absolute path, so every replica writes the same file whatever its cwd."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path.cwd() / url[len(prefix) :])
    return url


# Serve's proxy answers a request it gave up on with a plain-text 408; the ingress's own deadline, answered in
# OpenAI's format, must come first.
PROXY_TIMEOUT_MARGIN_S = 10.0


def http_options(spec: ServeSpec) -> dict[str, Any]:
    """``serve.start``'s http_options for a spec (a Serve config file sets the same under ``http_options``)."""
    return {"host": spec.host, "port": spec.port, "request_timeout_s": spec.request_timeout_s + PROXY_TIMEOUT_MARGIN_S}


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
    """Model dirs and SQLite paths made absolute (replicas may run elsewhere), checked to exist; a SQLite store
    (after ``feedback.url_env``) refused for more than one ingress replica."""
    error = sqlite_replicas_error(spec.feedback.resolved_url(), spec.ingress_replicas, spec.feedback.url_env)
    if error:
        raise SpecError(error)
    variants = [
        v
        if v.model and "://" in v.model  # an object store: each replica downloads it (vLLM's: Ray Serve LLM does)
        else v.model_copy(update={"model": _resolve_path(v.model, f"serve.variants[{i}] ({v.name}).model")})
        for i, v in enumerate(spec.variants)
    ]
    if INGRESS_NAME in {v.name for v in variants}:
        raise SpecError(f"serve.variants: the name {INGRESS_NAME!r} is taken by the HTTP ingress")
    feedback = spec.feedback.model_copy(update={"url": _absolute_sqlite(spec.feedback.url)})
    return spec.model_copy(update={"variants": variants, "feedback": feedback})


def user_hash_key(spec: FeedbackSpec) -> str:
    """Hex of the key the store hashes ``user`` with: from the env var ``spec.user_hash_key_env`` where the app is
    built, else random, so hashes agree across this deployment's replicas, and across deployments only with the env
    var set. It travels to the replicas with the app, like the API keys' digests."""
    secret = os.environ.get(spec.user_hash_key_env) if spec.user_hash_key_env else None
    if secret:
        return hashlib.sha256(secret.encode("utf-8")).hexdigest()
    log.info(
        "%s is not set: the feedback store hashes `user` with a random key, so the hashes change when the app is "
        "deployed again",
        spec.user_hash_key_env or "serve.feedback.user_hash_key_env",
    )
    return secrets.token_hex(32)


def human_eval_prompts(spec: ServeSpec) -> list[str]:
    """The prompts the human evaluation page shows, read where the app is built (none when the page is off)."""
    from chatforge.eval.prompts import load_prompts

    if not spec.human_eval.enabled:
        return []
    try:
        return [prompt.text for prompt in load_prompts(spec.human_eval.prompts)]
    except (OSError, ValueError) as error:
        raise SpecError(f"serve.human_eval.prompts: {error}") from None


def variant_deployment(variant: VariantSpec):
    """The variant's model deployment: chatforge's engine (`ModelReplica`), or vLLM (`chatforge.serve.vllm`)."""
    if variant.engine_kind == "vllm":
        from chatforge.serve.vllm import vllm_deployment

        return vllm_deployment(variant)
    return ModelReplica.options(
        name=variant.name,
        autoscaling_config=variant.autoscaling.serve_config(),
        ray_actor_options={"num_cpus": variant.num_cpus, "num_gpus": variant.num_gpus},
        max_ongoing_requests=variant.max_ongoing_requests,
        max_queued_requests=variant.max_queued_requests,  # past it the ingress answers 503 `overloaded`
    ).bind(variant)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for a ServeSpec given as ``args`` (see ``load_serve_spec``).

    The API keys are read here, and their digests handed to the ingress replicas, which refuse to start without
    keys unless ``auth.anonymous`` is set and Serve binds a loopback address (checked here too, to fail early)."""
    from ray.serve.config import BackpressureConfig

    from chatforge.compat import serve_http_host
    from chatforge.serve.auth import ApiKeys, check_access

    spec = prepare_spec(load_serve_spec(args))
    try:
        keys = ApiKeys.from_spec(spec.auth)
        check_access(keys, spec.auth.anonymous, None if keys.enabled else serve_http_host())
    except ValueError as error:
        raise SpecError(str(error)) from None
    models = {variant.name: variant_deployment(variant) for variant in spec.variants}
    return ChatIngress.options(
        name=INGRESS_NAME,
        num_replicas=spec.ingress_replicas,
        ray_actor_options={"num_cpus": spec.ingress_num_cpus},
        max_ongoing_requests=max(256, sum(v.max_ongoing_requests for v in spec.variants)),
        max_queued_requests=spec.max_queued_requests,  # past it Serve's proxy answers 503 itself
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
        # the A/B split as user_config: a config deploy that changes only it reweights the running replicas
        user_config={"weights": {v.name: v.weight for v in spec.variants}},
    ).bind(spec, models, keys.hex_digests(), user_hash_key(spec.feedback), human_eval_prompts(spec))
