"""The HTTP router: an OpenAI-compatible proxy in front of several backends.

``build_router_app(backends, router)`` is a FastAPI app that

- polls every backend's ``GET /load`` (each on its own task, every ``poll_interval``
  seconds) and routes each ``POST /v1/completions`` / ``/v1/chat/completions`` with a
  routing policy of ``fairbatch.routing`` over the backends' loads, plus the
  router's own count of what it sent since each poll (``Router.observe``);
- marks a backend unhealthy after ``failures_to_mark_down`` consecutive failed polls
  (timeout, bad answer; default 3), or at once when a connection to it is refused or
  reset (its process is gone), and sends it nothing until a poll succeeds again. One slow
  poll is not a dead backend: a backend busy parsing a large body misses a poll and is
  still the one to answer that body;
- streams answers through (SSE), and retries on another backend a request that has not
  started: nothing was sent to the client yet — no response headers for a non-streaming
  request, no event carrying output (a chat stream's leading role-only event is held back
  until then) for a streaming one. Causes: a transport error, a 5xx answer, an error
  event before any output, or the backend being marked unhealthy while the request waited
  for its first token. Each backend is tried at most once per request.
- treats a 429 (a backend whose scheduler refused the request: ``late=reject``, it could
  not meet its TTFT there) the same way: the request goes to the next backend the policy
  picks among those not tried, and the backend stays healthy. When every backend refused
  it, the router answers 429 itself (``Retry-After``, the reason in
  ``x-llm-d-request-dropped-reason``). Other 4xx answers are the client's: passed
  through, never retried: a bad request is bad on every backend.
- ends a stream that had started and then lost its backend with an OpenAI-format
  ``error`` event naming the backend and the cause (and no ``[DONE]``): the output cannot
  be resumed elsewhere, so the client is told clearly;
- answers ``GET /health`` (200 while a backend is healthy), ``GET /v1/models`` (a healthy
  backend's), ``GET /load`` (the cluster's aggregate load, so routers can be stacked),
  ``GET /backends`` (each backend's state; the launcher's pids, nodes and log paths only
  with ``show_backend_details``) and ``GET /metrics`` (Prometheus, its own
  ``fairbatch_router:`` series);
- with ``api_key``, requires ``Authorization: Bearer KEY`` on ``/v1/*`` (and on
  ``/metrics``, ``/load``, ``/backends`` with ``protect_admin``), polls backends with
  ``backend_api_key``; bound to loopback, answers only loopback ``Host`` headers
  (``server/access.py``). It starts answering only once every backend was polled once, so
  no worker of several sharing a port routes on an empty view.

A backend without ``/load`` (vLLM, SGLang) is polled on ``/health`` instead, and routed
by the router's own in-flight counts. Everything lives in the app: no global state.

The modules, in the order a request meets them:

- ``app.py``: the FastAPI app and its endpoints; ``config.py``: its settings;
- ``forward.py``: one request over the backends, retried until one takes it;
- ``prompt_estimate.py``: the prompt length it is routed on (no tokenizer here);
- ``attempt.py``: one try on one backend; ``stream_start.py``: has a stream started?;
- ``relay.py``: the rest of a stream that started;
- ``state.py``: backends, loads and health; ``backend.py``: one backend;
  ``polling.py``: the load polls; ``failures.py``: how a backend fails a request;
- ``metrics.py``: the ``fairbatch_router:`` Prometheus series.
"""

from fairbatch.cluster.router.app import build_router_app
from fairbatch.cluster.router.config import RouterConfig

__all__ = ["RouterConfig", "build_router_app"]
