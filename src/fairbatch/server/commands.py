"""`fairbatch serve`: the OpenAI-compatible server on the engine."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fairbatch.engine.commands import (
    PREFIX_CACHING_FLAGS,
    PREFIX_CACHING_HELP,
    AsyncScheduling,
    AttentionOverlap,
    PiecewiseGraphs,
    PrefillAttention,
)
from fairbatch.server.access import API_KEY_ENV

# What a queued request is assumed to wait behind when no queue cap is given: each running
# request frees its slot after about this many output tokens at the TPOT SLO.
QUEUE_CAP_OUTPUT_TOKENS = 32
DEFAULT_MAX_CHOICES = 16


def default_max_pending(max_num_seqs: int, ttft_slo: float, tpot_slo: float) -> int:
    """The queue cap when ``--max-pending`` is not given, from the SLO: the running batch,
    plus the requests that can still start within the TTFT SLO if each running request
    frees its slot after ``QUEUE_CAP_OUTPUT_TOKENS`` tokens at the TPOT SLO. Anything
    queued beyond that would wait past its TTFT, so it is better told 503 + Retry-After at
    once (another replica, or later). ``--late reject`` refuses such requests more exactly,
    from the scheduler's own prediction."""
    turns = max(1, math.ceil(ttft_slo / (QUEUE_CAP_OUTPUT_TOKENS * tpot_slo)))
    return max_num_seqs * (1 + turns)


def scheduler_config_for(policy: str, *, ttft_slo: float, tpot_slo: float, max_num_batched_tokens: int,
                         max_num_seqs: int, max_model_len: int | None,
                         scheduler_options: dict[str, Any] | None) -> Any:
    """The ``SchedulerConfig`` for these options; ValueError naming the bad one. No torch."""
    from dataclasses import fields

    from fairbatch.scheduler import SchedulerConfig, policy_names

    if policy not in policy_names():
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(policy_names())}")
    if not (ttft_slo > 0 and tpot_slo > 0):
        raise ValueError("--ttft-slo and --tpot-slo must be positive (seconds)")
    options = scheduler_options or {}
    unknown = sorted(set(options) - {f.name for f in fields(SchedulerConfig)})
    if unknown:
        raise ValueError(f"unknown scheduler option {unknown[0]!r}")
    # a bad value (late=...) is one line here, not an engine start-up failure
    return SchedulerConfig(**{
        "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
        "ttft_slo": ttft_slo, "tpot_slo": tpot_slo,
        # default: the engine clips it to the model's context
        "max_model_len": max_model_len if max_model_len is not None else 1 << 30,
        **options})


def load_served_model(model: str, *, policy: str = "fairbatching", ttft_slo: float = 1.0, tpot_slo: float = 0.05,
                      served_model_name: str | None = None, scheduler_options: dict[str, Any] | None = None,
                      max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, max_model_len: int | None = None,
                      profile: str | None = None, cpu_threads: int | None = None, refit_latency: bool = False,
                      **engine_kwargs: Any) -> "ServedModel":  # noqa: F821
    """Build the engine (``fairbatch.engine.LLM``) in this process and wrap it for the server.

    Raises ``ValueError`` (``EngineError`` is one) with a one-line message for anything a
    user got wrong: unknown preset or policy, bad model directory, bad option."""
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError("--cpu-threads must be >= 1")
    cfg = scheduler_config_for(policy, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                               max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                               max_model_len=max_model_len, scheduler_options=scheduler_options)
    import torch  # only once the options are known to be good

    from fairbatch.engine import LLM
    from fairbatch.server.model import ServedModel

    if cpu_threads is not None:
        # Small CPU models are much faster on one intra-op thread: torch's thread pool costs
        # milliseconds per tiny op (softmax of a few scores) on small machines.
        torch.set_num_threads(cpu_threads)
    latency = None
    if profile is not None:
        from fairbatch.latency.profiles import load_profile

        latency = load_profile(profile)
    llm = LLM(model, policy=policy, scheduler_config=cfg, latency_model=latency,
              max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
              max_model_len=max_model_len, **engine_kwargs)
    if refit_latency:
        # Refit the step-time model from the steps this engine runs (the serving loop feeds it).
        from fairbatch.latency.online import OnlineLatencyModel

        online = OnlineLatencyModel(llm.latency_model)
        llm.latency_model = llm.scheduler.latency = online
    return ServedModel.of_llm(llm, served_model_name)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: Annotated[str, typer.Option(help="Model preset (e.g. llama-3-8b, tiny-llama) or Hugging Face model directory.")],
        load_format: Annotated[str, typer.Option(help="auto, safetensors, dummy (random weights), or simulated: no "
                                                  "model runs; each step lasts what the GPU step-time profile predicts "
                                                  "(--profile, whose GPU it simulates, KV cache size included; else the "
                                                  "shipped H100 one for --model) and the "
                                                  "output token ids are SYNTHETIC (fixed filler text, made-up "
                                                  "logprobs). For measuring the served stack at GPU rates on a CPU.")] = "auto",
        policy: Annotated[str, typer.Option(help="Scheduling policy: fairbatching, qoserve, sarathi, vllm, vllm-priority, prefill-first.")] = "fairbatching",
        ttft_slo: Annotated[float, typer.Option(help="Default TTFT SLO, seconds (a request may override it with its `slo` field).")] = 1.0,
        tpot_slo: Annotated[float, typer.Option(help="Default TPOT SLO, seconds.")] = 0.05,
        host: Annotated[str, typer.Option(help="Address to listen on (on a loopback address, requests "
                                          "must name a loopback Host: DNS-rebinding guard).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
        served_model_name: Annotated[Optional[str], typer.Option(help="Model id clients use; default: --model.")] = None,
        dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
        device: Annotated[Optional[str], typer.Option(help="cuda or cpu; default: cuda when available.")] = None,
        attention_backend: Annotated[Optional[str], typer.Option(help="torch or triton; default by device.")] = None,
        max_model_len: Annotated[Optional[int], typer.Option(help="Context limit; default: the model's.")] = None,
        max_num_seqs: Annotated[int, typer.Option(help="Requests running at once (vLLM's default below 70 GB; "
                                                      "the simulator models an H100 at 1024).")] = 256,
        max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget per step (vllm policy).")] = 8192,
        num_kv_blocks: Annotated[Optional[int], typer.Option(help="KV-cache blocks; default: from GPU memory (1024 on CPU).")] = None,
        enable_prefix_caching: Annotated[bool, typer.Option(*PREFIX_CACHING_FLAGS, help=PREFIX_CACHING_HELP)] = True,
        piecewise_cuda_graphs: PiecewiseGraphs = False,
        attention_overlap: AttentionOverlap = False,
        prefill_attention: PrefillAttention = "triton",
        gpu_memory_utilization: Annotated[float, typer.Option(help="Fraction of GPU memory for weights + KV cache.")] = 0.9,
        max_pending: Annotated[Optional[int], typer.Option(help="Requests held at once (running + queued); beyond it 503 + "
                                                         "Retry-After. Default: from the SLO (docs/SERVING.md).")] = None,
        max_choices: Annotated[int, typer.Option(min=1, max=256, help="Choices one request may ask for (prompts x n).")] = DEFAULT_MAX_CHOICES,
        default_max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Output limit of a chat request that "
                                                                  "sets none; default: the rest of the context, as "
                                                                  "vLLM (completions: 16, as OpenAI).")] = None,
        api_key: Annotated[Optional[str], typer.Option(envvar=API_KEY_ENV, show_envvar=True, show_default=False,
                                                       help="Require Authorization: Bearer KEY on /v1/* (as "
                                                       "vLLM's --api-key).")] = None,
        api_key_admin: Annotated[bool, typer.Option(help="Require the API key on /metrics, /profile and /load "
                                                    "too (/health stays open).")] = False,
        max_body_bytes: Annotated[Optional[int], typer.Option(min=1024, help="Largest request body (413 beyond); "
                                                              "default: 1 MiB + 64 bytes per token of context.")] = None,
        header_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a connection has to send a request's "
                                                      "line and headers.")] = 10.0,
        body_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a request body has to arrive (408).")] = 60.0,
        keep_alive_timeout: Annotated[int, typer.Option(min=1, help="Seconds an idle connection is kept open.")] = 30,
        max_connections: Annotated[Optional[int], typer.Option(min=1, help="Connections + requests in progress; "
                                                               "beyond it 503. Default: from the open-file limit "
                                                               "(at most 4096).")] = None,
        engine_restarts: Annotated[int, typer.Option(min=0, help="Times a dead engine process is started again "
                                                     "(0: never); /health answers 503 meanwhile.")] = 3,
        profile: Annotated[Optional[Path], typer.Option(help="Latency profile JSON for the scheduler (from `fairbatch profile`).")] = None,
        set_option: Annotated[Optional[list[str]], typer.Option("--set", help="Scheduler option KEY=VALUE, one the policy reads; repeatable.")] = None,
        seed: Annotated[int, typer.Option(help="Seed for dummy weights and sampling.")] = 0,
        cpu_threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads (CPU engine); 1 is fastest for tiny models.")] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
        access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
        warmup: Annotated[bool, typer.Option(help="On a GPU, run a few requests before answering /health "
                                             "(compiles kernels outside clients' TTFT).")] = True,
        refit_latency: Annotated[bool, typer.Option(help="Refit the scheduler's step-time model online from the "
                                                    "steps this engine runs (a profile is only as good as "
                                                    "its host).")] = True,
        late: Annotated[Optional[str], typer.Option(help="Requests that can no longer meet their SLO, the same for "
                                                    "every policy: serve (in the policy's order), relegate "
                                                    "(behind the ones on time) or reject (refused: HTTP 429). "
                                                    "Default: the scheduler's (relegate); same as --set late=...")] = None,
        tpot_margin: Annotated[float, typer.Option(help="FairBatching paces tokens this fraction inside the TPOT "
                                                   "SLO: room for steps that overrun the step-time model "
                                                   "(a real engine's do; the simulator's do not, its "
                                                   "default is 0).")] = 0.1,
        ttft_margin: Annotated[float, typer.Option(help="Every policy plans first tokens this many seconds "
                                                   "before their TTFT deadline: room for what the server "
                                                   "adds after the step (IPC, detokenizing, streaming; "
                                                   "docs/ALGORITHM.md). At most half a request's TTFT.")] = 0.1,
        async_scheduling: AsyncScheduling = False,
        engine_thread: Annotated[bool, typer.Option(help="Run the engine on a thread of the server process "
                                                    "instead of its own process (slower under load).")] = False,
        metrics_prefix: Annotated[str, typer.Option(help="Prefix of the /metrics names: 'vllm' publishes them as "
                                                    "vLLM's (vllm:num_requests_running, ...), so vLLM dashboards "
                                                    "work unchanged.")] = "fairbatch",
    ) -> None:
        """Serve a model with an OpenAI-compatible API (completions, chat, /metrics, /load)."""
        from fairbatch.cli import console, fail, listen_or_fail, parse_options
        from fairbatch.scheduler.base import check_policy_options
        from fairbatch.server.app import build_app
        from fairbatch.server.runner import serve_forever

        from fairbatch.server.access import api_key_from, is_loopback
        from fairbatch.server.runner import ConnectionLimits

        from fairbatch.server.metrics import valid_prefix

        try:
            valid_prefix(metrics_prefix)        # before the model loads, as one line
        except ValueError as e:
            raise fail(str(e)) from None
        if max_pending is None:
            max_pending = default_max_pending(max_num_seqs, ttft_slo, tpot_slo) if ttft_slo > 0 and tpot_slo > 0 else 1
        if max_pending < 1:
            raise fail("--max-pending must be >= 1")
        try:
            limits = ConnectionLimits(header_timeout=header_timeout, keep_alive=keep_alive_timeout,
                                      max_connections=max_connections)
        except ValueError as e:
            raise fail(str(e)) from None
        try:
            options = parse_options(set_option or [])
            check_policy_options(policy, options)   # --set names only options the policy reads
        except ValueError as e:
            raise fail(str(e)) from None
        if not 0.0 <= tpot_margin < 1.0:
            raise fail("--tpot-margin must be in [0, 1)")
        options.setdefault("tpot_margin", tpot_margin)
        if not ttft_margin >= 0.0:
            raise fail("--ttft-margin must be >= 0")
        options.setdefault("ttft_margin", ttft_margin)
        if late is not None:
            from fairbatch.scheduler.late import Late

            try:
                options["late"] = Late.parse(late).value      # --late wins over --set late=...
            except ValueError as e:
                raise fail(str(e)) from None
        sock = listen_or_fail(host, port)
        load_kwargs = dict(
            model=model, policy=policy, ttft_slo=ttft_slo, tpot_slo=tpot_slo, scheduler_options=options,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            profile=str(profile) if profile else None, load_format=load_format, dtype=dtype, device=device,
            attention_backend=attention_backend, num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, cpu_threads=cpu_threads,
            refit_latency=refit_latency, enable_prefix_caching=enable_prefix_caching,
            piecewise_cuda_graphs=piecewise_cuda_graphs, attention_overlap=attention_overlap,
            prefill_attention=prefill_attention, async_scheduling=async_scheduling)
        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                            format="%(levelname)s %(name)s: %(message)s")
        backend = None
        try:
            if engine_thread:
                served = load_served_model(served_model_name=served_model_name, **load_kwargs)
                # The engine thread shares the GIL with the event loop: a 1 ms switch interval
                # (the default is 5 ms) bounds how long a torch call waits for the loop.
                sys.setswitchinterval(0.001)
            else:
                from fairbatch.server.engine_process import spawn_engine
                from fairbatch.server.model import ServedModel

                if profile is not None and not profile.is_file():
                    raise ValueError(f"profile {profile} not found")
                scheduler_config_for(policy, ttft_slo=ttft_slo, tpot_slo=tpot_slo,   # fail fast, before a spawn
                                     max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                     max_model_len=max_model_len, scheduler_options=options)
                if cpu_threads is not None and cpu_threads < 1:
                    raise ValueError("--cpu-threads must be >= 1")
                spawn_kwargs = dict(name=served_model_name, warmup=warmup, log_level=log_level)
                info, backend = spawn_engine(load_kwargs, **spawn_kwargs)
                if engine_restarts > 0:
                    from fairbatch.server.engine_restart import RestartingBackend

                    backend = RestartingBackend(backend, lambda: spawn_engine(load_kwargs, **spawn_kwargs),
                                                max_restarts=engine_restarts)
                served = ServedModel(info)
        except (ValueError, OSError) as e:
            sock.close()
            raise fail(str(e)) from None
        app_ = build_app(served, backend=backend, max_pending=max_pending, max_body_bytes=max_body_bytes,
                         body_timeout=body_timeout, max_choices=max_choices, default_max_tokens=default_max_tokens,
                         api_key=api_key_from(api_key), protect_admin=api_key_admin, loopback_only=is_loopback(host),
                         metrics_prefix=metrics_prefix)
        bound = sock.getsockname()
        late_mode = f", late={options['late']}" if "late" in options else ""
        console.print(f"serving [bold]{served.name}[/] ({served.device}, policy {policy}{late_mode}, "
                      f"{served.num_blocks} KV blocks, prefix caching {'on' if served.prefix_caching else 'off'}, "
                      f"{'async scheduling, ' if async_scheduling else ''}"
                      f"context {served.max_model_len}, "
                      f"SLO TTFT {ttft_slo:g}s / TPOT {tpot_slo * 1e3:g}ms) on http://{host}:{bound[1]}",
                      highlight=False)
        serve_forever(app_, sock, log_level=log_level, access_log=access_log, limits=limits)
