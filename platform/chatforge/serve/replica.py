"""One model variant's replica: ``@serve.batch`` gathers concurrent calls into the continuous-batching engine.

The ingress (``chatforge.serve.app``) calls ``generate`` (a whole answer) or ``stream`` (Accepted | Rejected, then
chunks, then Finished) through a DeploymentHandle; the replica tokenizes with the model's chat template and checks
the context window itself, so the ingress needs no tokenizer.
"""

import asyncio
from dataclasses import dataclass
from typing import Any

from ray import serve

from chatforge.config import VariantSpec
from chatforge.serve.engine import Completion, SamplingParams

# ---------------------------------------------------------------- what the ingress and a replica exchange


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict[str, str]]
    params: SamplingParams
    # The caller's time left: the caller cancels the call at its deadline, and the replica stops by this long after
    # the call arrives in case that cancel never comes (the caller died).
    timeout_s: float | None = None


@dataclass(frozen=True)
class Rejected:
    """A request the replica refuses before generating (prompt over the window, unrenderable conversation)."""

    message: str
    param: str = "messages"
    code: str = "context_length_exceeded"


@dataclass(frozen=True)
class Accepted:
    """First item of a stream: the prompt fits."""

    prompt_tokens: int


@dataclass(frozen=True)
class Finished:
    """Last item of a stream."""

    completion_tokens: int


# ---------------------------------------------------------------- one model variant


def local_model(model: str) -> str:
    """The variant's model dir on this node: itself, or an object-store URI downloaded once into chatforge's cache
    (``$CHATFORGE_CACHE_DIR/models``)."""
    from chatforge import storage
    from chatforge.train.pretrained import cache_dir

    return storage.local_copy(model, str(cache_dir() / "models"))


@serve.deployment
class ModelReplica:
    """One variant's model in one replica: ``@serve.batch`` gathers concurrent calls into the continuous-batching
    engine, which lets each sequence join and leave the running batch at token boundaries."""

    def __init__(self, variant: VariantSpec) -> None:
        from chatforge.compat import quiet_serve_batch_warning
        from chatforge.serve.engine import offline_engine
        from chatforge.serve.metrics import ServeMetrics

        self.name = variant.name
        engine_spec = variant.engine
        self.engine = offline_engine(local_model(variant.model), engine_spec, variant.num_cpus)
        self.metrics = ServeMetrics()
        self._pumps: dict[str, asyncio.Task] = {}
        # A batch call lasts as long as its longest answer; letting batches overlap (each request is one at most)
        # means a newcomer joins the engine's running batch at the next token instead of waiting for that answer.
        quiet_serve_batch_warning()
        batching = serve.batch(
            max_batch_size=engine_spec.max_batch_size,
            batch_wait_timeout_s=engine_spec.batch_wait_timeout_s,
            max_concurrent_batches=variant.max_ongoing_requests,
        )
        self._complete_batch = batching(self._complete_many)
        self._stream_batch = batching(self._stream_many)

    async def _prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams] | Rejected:
        from chatforge.serve.engine import PromptTooLong

        try:
            prompt_ids = await asyncio.to_thread(self.engine.encode_chat, request.messages)
        except Exception as error:  # a chat template may refuse a conversation (e.g. roles must alternate)
            return Rejected(f"The conversation cannot be rendered by the model's chat template: {error}", code="")
        try:
            self.engine.check(prompt_ids, request.params.max_tokens)
        except PromptTooLong as error:
            return Rejected(
                f"This model's maximum context length is {error.limit} tokens, but the messages are "
                f"{error.prompt_tokens} tokens, which leaves no room for an answer: shorten the conversation."
            )
        except ValueError as error:
            return Rejected(f"Invalid messages: {error}", code="")
        return prompt_ids, request.params

    def _record_batch(self, size: int) -> None:
        self.metrics.batch(self.name, size)
        stats = self.engine.stats()
        self.metrics.engine_load(self.name, stats["running"], stats["waiting"])

    def _start(self, request_id: str, work) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._pumps[request_id] = task
        task.add_done_callback(lambda _t: self._pumps.pop(request_id, None))
        return task

    def _cancel(self, request_id: str) -> None:
        task = self._pumps.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def _complete_many(self, items: list[tuple[str, list[int], SamplingParams]]) -> list[Any]:
        self._record_batch(len(items))
        tasks = [self._start(rid, self.engine.complete(ids, params)) for rid, ids, params in items]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return list(results)  # an exception is one caller's result, not the batch's failure

    async def _stream_many(self, items: list[tuple[str, list[int], SamplingParams]]):
        """Yields one list per step: per caller the chunks it got since the last step (maybe none), an exception,
        or StopIteration once its answer is complete (Serve then ends that caller's stream)."""
        self._record_batch(len(items))
        end = object()
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in items]
        wake = asyncio.Event()

        async def pump(queue: asyncio.Queue, ids: list[int], params: SamplingParams) -> None:
            try:
                async for chunk in self.engine.stream(ids, params):
                    queue.put_nowait(chunk)
                    wake.set()
            except Exception as error:
                queue.put_nowait(error)
            finally:
                queue.put_nowait(end)
                wake.set()

        tasks = [self._start(rid, pump(q, ids, params)) for q, (rid, ids, params) in zip(queues, items)]
        drained = [False] * len(items)  # the pump ended and everything it queued was handed out
        pumped = [False] * len(items)
        try:
            while not all(drained):
                await wake.wait()
                wake.clear()
                step: list[Any] = []
                for i, queue in enumerate(queues):
                    if drained[i]:
                        step.append(StopIteration)
                        continue
                    got = []
                    while not queue.empty():
                        item = queue.get_nowait()
                        if item is end:
                            pumped[i] = True
                        else:
                            got.append(item)
                    if got:
                        step.append(got)
                        if pumped[i]:
                            wake.set()  # hand out StopIteration on the next round
                    elif pumped[i]:
                        drained[i] = True
                        step.append(StopIteration)
                    else:
                        step.append([])
                yield step
        finally:
            for task in tasks:
                task.cancel()

    async def generate(self, request: GenerationRequest) -> Completion | Rejected:
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejected):
            return prepared
        prompt_ids, params = prepared
        try:
            async with asyncio.timeout(request.timeout_s):
                result = await self._complete_batch((request.request_id, prompt_ids, params))
        finally:
            self._cancel(request.request_id)  # the caller went away or timed out: the engine drops the sequence
        if isinstance(result, BaseException):
            raise result
        return result

    async def stream(self, request: GenerationRequest):
        """Accepted | Rejected, then Chunks, then Finished."""
        prepared = await self._prepare(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        prompt_ids, params = prepared
        yield Accepted(len(prompt_ids))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s if request.timeout_s is not None else None
        tokens = 0
        try:
            async for chunks in self._stream_batch((request.request_id, prompt_ids, params)):
                if deadline is not None and loop.time() > deadline:
                    raise TimeoutError(f"the stream passed its deadline of {request.timeout_s:g} s")
                for chunk in chunks:
                    if isinstance(chunk, BaseException):
                        raise chunk
                    tokens = chunk.completion_tokens
                    yield chunk
        finally:
            self._cancel(request.request_id)
        yield Finished(tokens)

    def stats(self) -> dict:
        return self.engine.stats()
