"""The OpenAI-compatible FastAPI app: ``build_app(model)``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming and ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /load`` (the scheduler's load estimate, for routers),
``GET /profile`` (the scheduler's current step-time model, loadable by the simulator),
and vLLM's ``/tokenize``, ``/detokenize``, ``/version``, ``/ping`` (``vllm_routes.py``).
Request fields and answers are vLLM's: its sampling parameters (``sampling.py``),
logprob shapes (``logprobs.py``), ``stop_reason``; fields it cannot honour are 400s
(``unsupported.py``).

Robustness rules: every request is validated before it reaches the engine (bad body,
unknown model, over-long prompt -> 400/404 in OpenAI's error format); a full server
answers 503 with ``Retry-After``; a request the scheduler refuses (``late=reject``: it can
no longer meet its TTFT) is answered 429 with ``Retry-After`` and the reason in
``x-llm-d-request-dropped-reason``, streamed or not: a stream's status and headers are
sent only once its first output (or its refusal) exists; a client that goes away has its
requests aborted at once (their KV blocks freed at the engine's next step boundary); any
unexpected error in a handler is one request's 500, never the server's end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fairbatch.engine.params import SamplingParams
from fairbatch.request import SLO
from fairbatch.server.access import AccessControl, protected_paths
from fairbatch.server.async_engine import AsyncEngine, EngineDead, QueueFull, RequestGroup, clock
from fairbatch.server.body_limit import DEFAULT_BODY_TIMEOUT, BodyLimit, body_limit
from fairbatch.server.body_precheck import LargeBodyCheck, max_json_values
from fairbatch.server.errors import (
    DROPPED_REASON_HEADER,
    LATE_REJECT_REASON,
    APIError,
    bad_request,
    error_body,
    error_response,
    format_validation_errors,
)
from fairbatch.server.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from fairbatch.server.metrics import CONTENT_TYPE, ServerMetrics
from fairbatch.server.model import ServedModel
from fairbatch.server.openapi import document_errors
from fairbatch.server.output import OutputProcessor
from fairbatch.server.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, SLOField, _Sampling
from fairbatch.server.sampling import logprobs_count, prompt_logprobs_count, sampling_params
from fairbatch.server.vllm_routes import add_vllm_routes

log = logging.getLogger("fairbatch.server")

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
# A body larger than this is tokenized and turned into requests on a worker thread: the
# tokenizer (Rust) and the checks run there while the event loop keeps streaming. Smaller
# ones stay on the loop, where they cost less than the hop.
OFFLOAD_BODY_BYTES = 64 << 10


def build_app(model: ServedModel, *, backend: Any = None, max_pending: int = 4096, retry_after: int = 1,
              metrics_prefix: str = "fairbatch", max_body_bytes: int | None = None,
              body_timeout: float | None = DEFAULT_BODY_TIMEOUT, max_choices: int = MAX_CHOICES,
              default_max_tokens: int | None = None, api_key: str | None = None, protect_admin: bool = False,
              loopback_only: bool = False) -> FastAPI:
    """An app serving ``model``; the engine starts and stops with the app's lifespan.

    ``backend``: where the engine loop runs (``engine_process.ProcessBackend`` from
    ``spawn_engine``); default, a thread of this process on ``model``'s in-process engine.

    ``max_pending``: requests (choices) the server holds at once, running or queued; one
    more is answered 503 with ``Retry-After: retry_after``. A request the scheduler refuses
    (``late=reject``) is answered 429 with the same ``Retry-After``. Bodies over
    ``max_body_bytes`` (default: ``body_limit`` of the model's context) are refused with
    413 before they are buffered, bodies slower than ``body_timeout`` seconds with 408.

    ``max_choices``: prompts x ``n`` one request may ask for. ``default_max_tokens``: the
    output limit of a chat request that gives none (default, as vLLM: the rest of the
    context; completions default to OpenAI's 16 either way).

    ``api_key``: ``/v1/*`` needs ``Authorization: Bearer <key>`` (and ``/metrics``,
    ``/profile``, ``/load`` too with ``protect_admin``). ``loopback_only``: answer only
    requests whose ``Host`` is a loopback address (set when bound to one)."""
    metrics = ServerMetrics(model.name, prefix=metrics_prefix, max_model_len=model.max_model_len)
    engine = AsyncEngine(model, backend=backend, max_pending=max_pending, metrics=metrics)
    metrics.engine = engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="fairbatch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server on the FairBatching scheduler.")
    # Starlette runs the last added middleware first: the access check, the body's size and
    # time, then a large body's value count (in a helper process), then FastAPI's parsing.
    app.add_middleware(LargeBodyCheck, max_values=max_json_values(model.max_model_len))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or body_limit(model.max_model_len), timeout=body_timeout,
                       why="" if max_body_bytes else f" (the limit for a {model.max_model_len}-token context)")
    app.add_middleware(AccessControl, api_key=api_key, protected=protected_paths(protect_admin),
                       loopback_only=loopback_only)
    document_errors(app, per_path={"/v1/models": (401, 421), "/health": (503,), "/load": (401, 421, 503),
                                   "/profile": (401, 421, 503), "/metrics": (401, 421)})
    app.state.model = model
    app.state.engine = engine
    app.state.metrics = metrics
    created = int(time.time())

    # --- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = format_validation_errors(list(e.errors()), getattr(e, "body", None))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in a handler")
        return error_response(500, f"internal error: {type(e).__name__}")

    # --- helpers ---------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name not in model.names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")

    def submit(reqs: list[Any]) -> RequestGroup:
        try:
            return engine.add(reqs)
        except QueueFull as e:
            metrics.on_reject(len(reqs))
            raise APIError(503, f"server is at capacity: {e}; retry later",
                           headers={"Retry-After": str(retry_after)}) from None
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}", headers={"Retry-After": str(retry_after)}) from None

    def request_slo(field: SLOField | None) -> SLO:
        d = model.default_slo
        if field is None:
            return d
        ttft = field.ttft_ms / 1000.0 if field.ttft_ms is not None else d.ttft
        tpot = field.tpot_ms / 1000.0 if field.tpot_ms is not None else d.tpot
        name = field.slo_class or ("custom" if (field.ttft_ms or field.tpot_ms) else d.name)
        try:            # the schema bounds the milliseconds; this checks the seconds the scheduler gets
            return SLO(ttft, tpot, name)
        except ValueError as e:
            raise bad_request(str(e), "slo") from None

    def sampling(body: _Sampling, max_tokens: int) -> SamplingParams:
        try:
            return sampling_params(body, max_tokens, model.vocab_size)
        except ValueError as e:
            raise bad_request(str(e)) from None

    def check_tokens(ids: Sequence[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{model.vocab_size - 1})", param)

    def build_requests(body: _Sampling, prompts: list[list[int]], limit: int | None, default_limit: int | None,
                       arrival: float, prefix: str) -> list[Any]:
        if msg := body.unsupported():
            raise bad_request(msg)
        if len(prompts) * body.n > max_choices:
            raise bad_request(f"{len(prompts)} prompts x n={body.n} exceeds {max_choices} choices per request", "n")
        if body.stop_token_ids:
            check_tokens(body.stop_token_ids, "stop_token_ids")
        slo = request_slo(body.slo)
        lengths = []
        for ids in prompts:       # every length first: cheap, and bounds the vocabulary scan below
            try:
                if limit is not None:
                    lengths.append(model.check_length(len(ids), limit))
                else:             # a default never fails a request: at most the context left (vLLM's rule)
                    room = model.check_length(len(ids), None)
                    lengths.append(room if default_limit is None else min(default_limit, room))
            except ValueError as e:
                raise bad_request(str(e), "max_tokens" if ids and limit else "prompt") from None
        reqs = []
        for p, (ids, max_tokens) in enumerate(zip(prompts, lengths)):
            check_tokens(ids, "prompt")
            sp = sampling(body, max_tokens)
            for j in range(body.n):
                try:
                    reqs.append(model.make_request(f"{prefix}-{p * body.n + j}", ids, sp, slo=slo,
                                                   priority=body.priority, arrival=arrival))
                except ValueError as e:
                    raise bad_request(str(e), "prompt") from None
        return reqs

    def split_prompt(prompt: Any) -> tuple[list[str | None], list[list[int]]]:
        """The four shapes of ``prompt`` -> (texts or None, token ids) per prompt."""
        if isinstance(prompt, str):
            return [prompt], [model.encode(prompt)]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt[0], int):
            return [None], [list(prompt)]
        if isinstance(prompt[0], str):
            return list(prompt), [model.encode(t) for t in prompt]
        return [None] * len(prompt), [list(p) for p in prompt]

    # --- endpoints ---------------------------------------------------------------------------
    add_vllm_routes(app, model, engine)     # /tokenize, /detokenize, /version, /ping

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, engine.error or "engine not running")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": created, "owned_by": "fairbatch",
            "root": model.name, "parent": None, "max_model_len": model.max_model_len,
            "fairbatch": {"policy": model.policy, "vocab_size": model.vocab_size, "device": model.device,
                          "default_slo": {"ttft_ms": model.default_slo.ttft * 1e3,
                                          "tpot_ms": model.default_slo.tpot * 1e3}},
        }]})

    @app.get("/load")
    async def load() -> JSONResponse:
        try:
            ld = await engine.load()
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}") from None
        except asyncio.TimeoutError:
            raise APIError(503, "the engine did not answer in time") from None
        out = asdict(ld)
        out["num_requests"] = ld.num_requests
        out["policy"] = model.policy
        out["model"] = model.name
        out["max_pending"] = engine.max_pending
        out["num_requests_in_server"] = engine.num_active
        return JSONResponse(out)

    @app.get("/profile")
    async def profile() -> JSONResponse:
        """The step-time model the scheduler uses now (refitted online when enabled), in
        `fairbatch profile`'s format: `fairbatch simulate --profile` replays this host."""
        if engine.latency_profile is None:
            raise APIError(503, "the engine has not reported its step-time model yet")
        return JSONResponse(engine.latency_profile)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def off_loop_if_heavy(raw: Request, fn: Any) -> Any:
        """``fn()`` on a worker thread for a large body (tokenizing, scanning), else here."""
        size = raw.headers.get("content-length", "")
        if size.isdigit() and int(size) <= OFFLOAD_BODY_BYTES:
            return fn()
        return await run_in_threadpool(fn)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        arrival = clock()
        check_model(body.model)
        rid = f"cmpl-{uuid.uuid4().hex}"

        def prepare() -> tuple[list[list[int]], list[Any], list[str | None]]:
            try:
                texts, prompts = split_prompt(body.prompt)
            except ValueError as e:
                raise bad_request(str(e), "prompt") from None
            reqs = build_requests(body, prompts, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, arrival, rid)
            echo: list[str | None] = [None] * len(reqs)
            if body.echo:
                echo = [texts[i // body.n] if texts[i // body.n] is not None
                        else model.decode(prompts[i // body.n]) for i in range(len(reqs))]
            return prompts, reqs, echo

        prompts, reqs, echo = await off_loop_if_heavy(raw, prepare)
        group = submit(reqs)
        usage_prompt = sum(len(p) for p in prompts)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model.name}
        k = logprobs_count(body)
        prompt_k = prompt_logprobs_count(body)
        offsets = [0] * len(reqs)          # text_offset of each choice's next logprob token

        def choice(i: int, text: str, reason: str | None, proc: OutputProcessor, first: bool) -> dict[str, Any]:
            """One choice's chunk (or whole answer); ``first``: its first, which carries the
            echoed prompt (and the prompt's logprobs), as vLLM sends it with the first token."""
            entries = proc.take_logprobs() if k is not None else []
            if first and body.echo:
                text = (echo[i] or "") + text
                if k is not None:
                    entries = list((proc.prompt_logprobs or [None])) + entries
            logprobs = None
            if k is not None:
                logprobs = completion_logprobs(entries, k, model.decode, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            out = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason,
                   "stop_reason": proc.stop_reason if reason is not None else None}
            if first and prompt_k is not None:      # asked for, or echo with logprobs (as vLLM)
                out["prompt_logprobs"] = prompt_logprobs_json(proc.prompt_logprobs, model.decode)
            return out

        if body.stream:
            usage_opts = body.stream_options
            outputs = await _first_output(_choices(group, model, body, retry_after), group, raw)

            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                async for ev in outputs:
                    if isinstance(ev, _Failure):
                        yield _sse(error_body(ev.status, ev.message))
                        break
                    i, text, reason, procs = ev
                    chunk = {**base, "choices": [choice(i, text, reason, procs[i], i not in started)]}
                    started.add(i)
                    if usage_opts and usage_opts.continuous_usage_stats:
                        chunk["usage"] = _usage(usage_prompt, procs)
                    yield _sse(chunk)
                else:
                    if usage_opts and usage_opts.include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(usage_prompt, procs_of(group))})
                yield "data: [DONE]\n\n"

            return _SSEResponse(events(), group)

        results = await _collect(group, model, body, raw, retry_after)
        procs = procs_of(group)
        choices = [choice(i, text, reason, procs[i], True) for i, (text, reason) in enumerate(results)]
        return JSONResponse({**base, "choices": choices, "usage": _usage(usage_prompt, procs_of(group))})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        arrival = clock()
        check_model(body.model)
        if msg := body.unsupported():
            raise bad_request(msg)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def prepare() -> tuple[list[int], list[Any]]:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in body.messages]
            try:
                _, ids = model.chat_prompt(messages, add_generation_prompt=body.add_generation_prompt,
                                           extra=body.chat_template_kwargs)
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
            return ids, build_requests(body, [ids], body.token_limit, default_max_tokens, arrival, rid)

        ids, reqs = await off_loop_if_heavy(raw, prepare)
        group = submit(reqs)
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model.name}
        k = logprobs_count(body)

        def chat_lp(proc: OutputProcessor) -> dict[str, Any] | None:
            return chat_logprobs(proc.take_logprobs(), k, model.decode) if k is not None else None

        if body.stream:
            usage_opts = body.stream_options
            outputs = await _first_output(_choices(group, model, body, retry_after), group, raw)

            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                async for ev in outputs:
                    if isinstance(ev, _Failure):
                        yield _sse(error_body(ev.status, ev.message))
                        break
                    i, text, reason, procs = ev
                    # a choice's role chunk goes out with its first token, in one write:
                    # a client stamping TTFT at the first chunk measures the first token
                    head = ""
                    if i not in started:
                        started.add(i)
                        head = _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
                    delta = {"content": text} if (text or reason is None) else {}
                    chunk = {**base, "choices": [{"index": i, "delta": delta, "logprobs": chat_lp(procs[i]),
                                                  "finish_reason": reason}]}
                    if reason is not None:
                        chunk["choices"][0]["stop_reason"] = procs[i].stop_reason
                    if usage_opts and usage_opts.continuous_usage_stats:
                        chunk["usage"] = _usage(len(ids), procs)
                    yield head + _sse(chunk)
                else:
                    if usage_opts and usage_opts.include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(len(ids), procs_of(group))})
                yield "data: [DONE]\n\n"

            return _SSEResponse(events(), group)

        results = await _collect(group, model, body, raw, retry_after)
        procs = procs_of(group)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": base["created"], "model": model.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": chat_lp(procs[i]), "finish_reason": reason, "stop_reason": procs[i].stop_reason}
                        for i, (text, reason) in enumerate(results)],
            "usage": _usage(len(ids), procs),
            "prompt_logprobs": prompt_logprobs_json(procs[0].prompt_logprobs, model.decode)
            if body.prompt_logprobs is not None else None})

    return app


# --- streaming machinery (event loop) --------------------------------------------------------
def _sse(obj: dict[str, Any]) -> str:
    # ASCII-only JSON: a raw U+2028 / U+0085 in generated text is a line break to clients
    # that split lines like str.splitlines (httpx does), which would cut the event in two.
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def _usage(prompt_tokens: int, procs: Sequence[OutputProcessor]) -> dict[str, int]:
    out = sum(p.num_tokens for p in procs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


def procs_of(group: RequestGroup) -> list[OutputProcessor]:
    return getattr(group, "processors", [])


@dataclass(slots=True)
class _Failure:
    """A request that ends without (more) output: the engine failed it (500), or the
    scheduler refused it (429, ``late=reject``)."""

    status: int
    message: str
    headers: dict[str, str] | None = None

    def error(self) -> APIError:
        return APIError(self.status, self.message, headers=self.headers)


def _refusal(req: Any, retry_after: int) -> _Failure:
    return _Failure(
        429, f"request refused ({LATE_REJECT_REASON}): it can no longer meet its time-to-first-token SLO of "
        f"{req.slo.ttft * 1e3:g} ms (the scheduler runs with late=reject); retry later, or with a looser "
        f"slo.ttft_ms", {"Retry-After": str(retry_after), DROPPED_REASON_HEADER: LATE_REJECT_REASON})


Output = tuple[int, str, "str | None", list[OutputProcessor]]


async def _choices(group: RequestGroup, model: ServedModel, body: _Sampling, retry_after: int = 1
                   ) -> AsyncIterator[Output | _Failure]:
    """Every delta of every choice as ``(index, text, finish_reason, processors)``; one item
    per engine step per choice (also when its text is held back and empty), so a client
    sees one event per generated token. Yields a ``_Failure`` and stops if the engine
    failed a request or the scheduler refused one. Aborts whatever is left when it ends,
    however it ends."""
    n = len(group.requests)
    stops = body.stop_strings()
    procs = [OutputProcessor(model.decode, stops, include_stop_str=body.include_stop_str_in_output,
                             min_tokens=body.min_tokens, stop_token_ids=body.stop_token_ids or ())
             for _ in range(n)]
    group.processors = procs   # type: ignore[attr-defined]
    closed: set[int] = set()
    try:
        while len(closed) < n:
            idx, d = await group.queue.get()
            if idx in closed:
                continue
            if d.error is not None:
                yield _Failure(500, f"request failed: {d.error}")
                return
            if d.rejected:
                yield _refusal(group.requests[idx], retry_after)
                return
            proc = procs[idx]
            proc.add_logprobs(d.logprobs, d.prompt_logprobs)
            text = proc.feed(d.token_ids, final=d.finish_reason is not None,
                             stopped_by_token=d.finish_reason == "stop")
            reason = d.finish_reason
            if proc.finish_reason == "stop" and reason is None:
                reason = "stop"
                group.abort(idx, finished=True)     # a stop string: finished, not aborted
            if reason is not None:
                closed.add(idx)
            yield idx, text, reason, procs
        metrics = getattr(group.engine, "metrics", None)
        if metrics is not None:       # every choice finished: vLLM's per-request n and longest output
            metrics.on_request_done(body.n, [p.num_tokens for p in procs])
    finally:
        group.abort()


async def _wait_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _first_output(outputs: AsyncIterator[Output | _Failure], group: RequestGroup, raw: Request
                        ) -> AsyncIterator[Output | _Failure]:
    """Wait, without sending anything, for a streamed request's first output: a request
    refused (429) or failed (500) before it produced any gets a real HTTP status, not a
    stream that began 200. Returns the outputs, the first one included; raises
    ``APIError`` for a refusal, a failure, or a client that left first (its requests
    aborted)."""
    first = asyncio.ensure_future(outputs.__anext__())
    watch = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({first, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not first.done():
            first.cancel()          # its generator's cleanup aborts the requests
            group.abort()
    if first not in done:
        raise APIError(499, "client disconnected")
    try:
        ev = first.result()
    except StopAsyncIteration:      # cannot happen (every request has a choice); never hang on it
        ev = _Failure(500, "the request ended without output")
    if isinstance(ev, _Failure):
        await outputs.aclose()
        raise ev.error()
    return _prepend(ev, outputs)


async def _prepend(first: Output, rest: AsyncIterator[Output | _Failure]) -> AsyncIterator[Output | _Failure]:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()         # type: ignore[attr-defined]


async def _collect(group: RequestGroup, model: ServedModel, body: _Sampling, raw: Request,
                   retry_after: int = 1) -> list[tuple[str, str | None]]:
    """Run a non-streaming request to the end; abort it if the client disconnects first.
    Raises ``APIError`` if the engine failed it (500) or the scheduler refused it (429)."""
    texts = [""] * len(group.requests)
    reasons: list[str | None] = [None] * len(group.requests)

    async def consume() -> _Failure | None:
        async for ev in _choices(group, model, body, retry_after):
            if isinstance(ev, _Failure):
                return ev
            i, text, reason, _ = ev
            texts[i] += text
            if reason is not None:
                reasons[i] = reason
        return None

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            group.abort()
            raise APIError(499, "client disconnected")
        error = work.result()
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        group.abort()
    if error is not None:
        raise error.error()
    return list(zip(texts, reasons, strict=True))


class _SSEResponse(StreamingResponse):
    """An SSE stream that always closes its generator and aborts its requests, whether the
    stream ended, the client disconnected, or the send failed."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = content
        self._group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass   # the client went away mid-send
        finally:
            self._group.abort()
            aclose = getattr(self._gen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:   # noqa: BLE001
                    pass
