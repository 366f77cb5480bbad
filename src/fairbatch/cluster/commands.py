"""`fairbatch route` (the HTTP router in front of running servers) and `fairbatch cluster`
(replicas placed with Ray, or as local processes, and the router in front of them)."""

from __future__ import annotations

import signal
import sys
from typing import Annotated, Any, Optional

import typer

from fairbatch.routing import router_names
from fairbatch.server.access import API_KEY_ENV

ROUTER_HELP = f"Routing policy: {', '.join(router_names())}; options as NAME:count_sent=false."
WORKERS_HELP = ("Router processes sharing the port: one spends 130-215 us of CPU per streamed token, so new "
                "requests queue behind the forwarding near 5,000-7,000 tokens/s (docs/CLUSTER.md).")


class _Stop(Exception):
    """SIGTERM / SIGINT arrived: stop everything, cleanly."""


def parse_backends(items: list[str]) -> list[str]:
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            u = part.strip().rstrip("/")
            if not u:
                continue
            if not (u.startswith("http://") or u.startswith("https://")):
                raise ValueError(f"bad --backend {u!r}: expected a URL like http://127.0.0.1:8001")
            if u in urls:
                raise ValueError(f"--backend {u} given twice")
            urls.append(u)
    if not urls:
        raise ValueError("give at least one --backend URL")
    return urls


def _router_config(poll_interval: float, poll_timeout: float, *, host: str = "127.0.0.1",
                   api_key: str | None = None, backend_api_key: str | None = None, **options: Any):
    from fairbatch.cluster.router import RouterConfig
    from fairbatch.server.access import api_key_from, is_loopback

    if not poll_interval > 0:
        raise ValueError("--poll-interval must be positive (seconds)")
    if not poll_timeout > 0:
        raise ValueError("--poll-timeout must be positive (seconds)")
    key = api_key_from(api_key)
    if options.get("max_body_bytes") is None:
        options.pop("max_body_bytes", None)
    backend_key = backend_api_key or key
    return RouterConfig(poll_interval=poll_interval, poll_timeout=poll_timeout, api_key=key, backend_api_key=backend_key,
                        loopback_only=is_loopback(host), **options)


def _connection_limits(header_timeout: float, keep_alive_timeout: int, max_connections: int | None):
    from fairbatch.server.runner import ConnectionLimits

    return ConnectionLimits(header_timeout=header_timeout, keep_alive=keep_alive_timeout,
                            max_connections=max_connections)


# Options `route` and `cluster` share (the router's own), as typer annotations.
ApiKey = Annotated[Optional[str], typer.Option(envvar=API_KEY_ENV, show_envvar=True, show_default=False,
                                               help="Require Authorization: Bearer KEY on /v1/* (vLLM's "
                                               "--api-key); also sent on the router's polls of the backends.")]
BackendApiKey = Annotated[Optional[str], typer.Option(envvar="FAIRBATCH_BACKEND_API_KEY", show_envvar=True,
                                                      show_default=False, help="Key the router sends to the "
                                                      "backends (polls and requests); default: --api-key.")]
ApiKeyAdmin = Annotated[bool, typer.Option(help="Require the API key on /metrics, /load and /backends too.")]
BackendDetails = Annotated[bool, typer.Option(help="/backends also lists pids, node names and log paths.")]
FailuresToMarkDown = Annotated[int, typer.Option(min=1, help="Consecutive failed polls that mark a backend "
                                                 "unhealthy (a refused connection marks it at once).")]
MaxBodyBytes = Annotated[Optional[int], typer.Option(min=1024, help="Largest request body (413 beyond); default "
                                                     "9 MiB, a server's limit at a 128k context.")]
HeaderTimeout = Annotated[float, typer.Option(min=0.001, help="Seconds a connection has to send a request's "
                                              "line and headers.")]
BodyTimeout = Annotated[float, typer.Option(min=0.001, help="Seconds a request body has to arrive (408).")]
KeepAlive = Annotated[int, typer.Option(min=1, help="Seconds an idle connection is kept open.")]
MaxConnections = Annotated[Optional[int], typer.Option(min=1, help="Connections + requests in progress; beyond "
                                                       "it 503. Default: from the open-file limit (at most 4096).")]
Port = Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")]


def register(app: typer.Typer) -> None:
    @app.command()
    def route(
        backend: Annotated[list[str], typer.Option("--backend", "-b", help="Backend base URL (an OpenAI-compatible server, e.g. `fairbatch serve`); repeat, or separate with commas.")],
        router: Annotated[str, typer.Option(help=ROUTER_HELP)] = "admission",
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Port = 8000,
        poll_interval: Annotated[float, typer.Option(help="Seconds between polls of each backend's /load.")] = 0.05,
        poll_timeout: Annotated[float, typer.Option(help="A poll slower than this fails, seconds.")] = 2.0,
        failures_to_mark_down: FailuresToMarkDown = 3,
        log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
        access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
        workers: Annotated[int, typer.Option(help=WORKERS_HELP)] = 1,
        api_key: ApiKey = None,
        backend_api_key: BackendApiKey = None,
        api_key_admin: ApiKeyAdmin = False,
        backend_details: BackendDetails = False,
        max_body_bytes: MaxBodyBytes = None,
        header_timeout: HeaderTimeout = 10.0,
        body_timeout: BodyTimeout = 60.0,
        keep_alive_timeout: KeepAlive = 30,
        max_connections: MaxConnections = None,
    ) -> None:
        """Route OpenAI requests over several servers by their load (streams through, retries, health checks)."""
        from fairbatch.cli import console, fail, listen_or_fail
        from fairbatch.cluster.router_workers import serve_router
        from fairbatch.routing import make_router

        try:
            urls = parse_backends(backend)
            r = make_router(router)
            cfg = _router_config(poll_interval, poll_timeout, host=host, api_key=api_key,
                                 backend_api_key=backend_api_key, failures_to_mark_down=failures_to_mark_down,
                                 protect_admin=api_key_admin, show_backend_details=backend_details,
                                 max_body_bytes=max_body_bytes, body_timeout=body_timeout)
            limits = _connection_limits(header_timeout, keep_alive_timeout, max_connections)
            if workers < 1:
                raise ValueError("--workers must be >= 1")
        except ValueError as e:
            raise fail(str(e)) from None
        sock = listen_or_fail(host, port)
        bound = sock.getsockname()[1]
        console.print(f"routing over {len(urls)} backend(s) ({', '.join(urls)}) with [bold]{r.name}[/]"
                      f"{'' if r.count_sent or not r.uses_load else ' (no sent-since-poll accounting)'} "
                      f"on http://{host}:{bound}{f' ({workers} worker processes)' if workers > 1 else ''}",
                      highlight=False)
        serve_router(urls, router, cfg, sock, workers=workers, log_level=log_level, access_log=access_log,
                     limits=limits)

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def cluster(
        ctx: typer.Context,
        model: Annotated[str, typer.Option(help="Model for every replica (a preset such as tiny-llama, or a model directory).")],
        replicas: Annotated[Optional[int], typer.Option(help="Replicas to start; default: one per GPU (1 without GPUs).")] = None,
        load_format: Annotated[str, typer.Option(help="auto, safetensors or dummy (random weights).")] = "auto",
        policy: Annotated[str, typer.Option(help="Scheduling policy of every replica.")] = "fairbatching",
        launcher: Annotated[str, typer.Option(help="ray (local Ray instance, or --address) or local (plain processes on this machine).")] = "ray",
        address: Annotated[Optional[str], typer.Option(help="An existing Ray cluster (e.g. auto, or ray://HEAD:10001); default: start a local one.")] = None,
        device: Annotated[str, typer.Option(help="auto (GPU replicas when there are GPUs), cuda or cpu.")] = "auto",
        cpus_per_replica: Annotated[float, typer.Option(help="CPUs Ray reserves for each replica.")] = 1.0,
        replica_host: Annotated[Optional[str], typer.Option(help="Address replicas listen on; default 127.0.0.1 (with --address, give one the router can reach, e.g. 0.0.0.0, and an --api-key).")] = None,
        start_timeout: Annotated[float, typer.Option(help="Seconds to wait for the replicas to serve.")] = 600.0,
        log_dir: Annotated[Optional[str], typer.Option(help="Folder for the replicas' logs; default: a new temporary one.")] = None,
        router: Annotated[str, typer.Option(help=ROUTER_HELP)] = "admission",
        host: Annotated[str, typer.Option(help="Address the router listens on.")] = "127.0.0.1",
        port: Port = 8000,
        poll_interval: Annotated[float, typer.Option(help="Seconds between polls of each replica's /load.")] = 0.05,
        poll_timeout: Annotated[float, typer.Option(help="A poll slower than this fails, seconds.")] = 2.0,
        failures_to_mark_down: FailuresToMarkDown = 3,
        log_level: Annotated[str, typer.Option(help="Log level of the router.")] = "info",
        router_workers: Annotated[int, typer.Option(help=WORKERS_HELP)] = 1,
        api_key: ApiKey = None,
        api_key_admin: ApiKeyAdmin = False,
        backend_details: BackendDetails = False,
        max_body_bytes: MaxBodyBytes = None,
        header_timeout: HeaderTimeout = 10.0,
        body_timeout: BodyTimeout = 60.0,
        keep_alive_timeout: KeepAlive = 30,
        max_connections: MaxConnections = None,
    ) -> None:
        """Start replicas of `fairbatch serve` (one per GPU, with Ray) and the router in front of them.

        Options this command does not know are passed to every `fairbatch serve`
        (e.g. --max-model-len 2048 --cpu-threads 1 --set late=serve)."""
        from fairbatch.cli import console, fail, listen_or_fail
        from fairbatch.cluster.launcher import Cluster, ClusterSpec, LaunchError
        from fairbatch.cluster.router_workers import serve_router
        from fairbatch.routing import make_router

        serve_args = ["--model", model, "--load-format", load_format, "--policy", policy, *ctx.args]
        if "--port" in ctx.args or "--host" in ctx.args:
            raise fail("--host/--port set the router's address; replicas get free ports (see --replica-host)")
        try:
            r = make_router(router)
            cfg = _router_config(poll_interval, poll_timeout, host=host, api_key=api_key,
                                 failures_to_mark_down=failures_to_mark_down, protect_admin=api_key_admin,
                                 show_backend_details=backend_details, max_body_bytes=max_body_bytes,
                                 body_timeout=body_timeout)
            limits = _connection_limits(header_timeout, keep_alive_timeout, max_connections)
            if router_workers < 1:
                raise ValueError("--router-workers must be >= 1")
            # the replicas get the key in their environment (not on a command line `ps` shows)
            env = {API_KEY_ENV: cfg.api_key} if cfg.api_key else {}
            spec = ClusterSpec(replicas=replicas, serve_args=serve_args, launcher=launcher, address=address,
                               device=device, cpus_per_replica=cpus_per_replica, replica_host=replica_host,
                               start_timeout=start_timeout, log_dir=log_dir, env=env)
            group = Cluster(spec, on_event=lambda m: console.print(m, highlight=False))
        except ValueError as e:
            raise fail(str(e)) from None
        sock = listen_or_fail(host, port)

        def stop(signum: int, frame: Any) -> None:
            raise _Stop()

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        err = ""
        try:
            infos = group.launch()
            for s in old:                 # ray.init installs handlers of its own: ours again
                signal.signal(s, stop)
            for i, info in enumerate(infos):
                where = f"GPU {','.join(info.gpus)}" if info.gpus else "CPU"
                console.print(f"  replica {i}: {info.url} (pid {info.pid}, {info.node}, {where}; log {info.log})",
                              highlight=False)
            bound = sock.getsockname()[1]
            console.print(f"routing over {len(infos)} replica(s) with [bold]{r.name}[/] on http://{host}:{bound}",
                          highlight=False)
            serve_router([i.url for i in infos], router, cfg, sock, workers=router_workers,
                         backend_meta=[i.meta() for i in infos], log_level=log_level, limits=limits)
        except (_Stop, KeyboardInterrupt):
            pass
        except LaunchError as e:
            err = str(e)
            code = 2
        finally:
            # Shutting down takes a bounded time (SIGTERM, then SIGKILL after 15 s): let it finish.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                sock.close()
            except OSError:
                pass
            console.print("stopping the replicas", highlight=False)
            group.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
        if code:
            raise fail(err)
        console.print("stopped", highlight=False)
        sys.stdout.flush()
