"""``fairbatch generate`` and ``fairbatch profile``: the engine's CLI commands.

Registered by ``fairbatch.cli`` through ``register(app)``. torch is imported only when a
command runs, so the rest of the CLI works without the engine extra installed. Errors a
user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


# Options shared by both commands (typer needs them spelled out per command).
Model = Annotated[str, typer.Option("--model", "-m", help="Hugging Face model directory, or a preset name with --load-format dummy.")]
LoadFormat = Annotated[str, typer.Option(help="auto | safetensors | dummy (random weights).")]
Dtype = Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32.")]
Device = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")]
Backend = Annotated[str | None, typer.Option(help="Attention backend: torch or triton (default: triton on CUDA).")]
KVBlocks = Annotated[int | None, typer.Option(help="KV cache blocks of 16 tokens (default: from free GPU memory; 1024 on CPU).")]
MaxLen = Annotated[int | None, typer.Option(help="Context limit (default: the model's).")]
MaxTokens = Annotated[int, typer.Option(help="Token budget of one step (scheduler max_num_batched_tokens).")]
MaxSeqs = Annotated[int, typer.Option(help="Most requests running at once.")]
Graphs = Annotated[bool, typer.Option(help="Replay CUDA graphs for decode-only steps (triton backend).")]
PiecewiseGraphs = Annotated[bool, typer.Option(
    "--piecewise-cuda-graphs/--no-piecewise-cuda-graphs",
    help="Replay per-bucket CUDA graphs of everything but attention for mixed/prefill steps over 256 tokens "
         "(experimental, not yet validated on a GPU; docs/PERFORMANCE.md).")]
AttentionOverlap = Annotated[bool, typer.Option(
    "--attention-overlap/--no-attention-overlap",
    help="Eager mixed steps: decode attention on a second CUDA stream beside the prefill chunks' "
         "(triton backend; off until measured on a GPU, docs/PERFORMANCE.md).")]
AsyncScheduling = Annotated[bool, typer.Option(
    "--async-scheduling/--no-async-scheduling",
    help="Plan each step while the last one runs (vLLM's --async-scheduling; the GPU no longer waits for the "
         "scheduler; a request that stops computes one token nobody sees). Off until measured on a GPU "
         "(docs/PERFORMANCE.md).")]
PrefillAttention = Annotated[str, typer.Option(
    help="Eager steps' prefill chunks: triton (the paged kernel) or sdpa (each chunk's context gathered, "
         "then torch's scaled-dot-product attention; triton backend; docs/PERFORMANCE.md).")]
# vLLM's spelling (--enable-prefix-caching / --no-enable-prefix-caching), and --no-prefix-caching
PREFIX_CACHING_FLAGS = ("--enable-prefix-caching/--no-enable-prefix-caching", " /--no-prefix-caching")
PREFIX_CACHING_HELP = ("Reuse the KV of cached full prompt blocks across requests (automatic prefix caching; "
                       "docs/PREFIX_CACHING.md).")
PrefixCaching = Annotated[bool, typer.Option(*PREFIX_CACHING_FLAGS, help=PREFIX_CACHING_HELP)]


def _engine_kwargs(load_format, dtype, device, attention_backend, num_kv_blocks, max_model_len,
                   max_num_batched_tokens, max_num_seqs, cuda_graphs, seed, enable_prefix_caching=True,
                   piecewise_cuda_graphs=False, attention_overlap=False, prefill_attention="triton") -> dict:
    return dict(load_format=load_format, dtype=dtype, device=device, attention_backend=attention_backend,
                num_kv_blocks=num_kv_blocks, max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                cuda_graphs=cuda_graphs, seed=seed, enable_prefix_caching=enable_prefix_caching,
                piecewise_cuda_graphs=piecewise_cuda_graphs, attention_overlap=attention_overlap,
                prefill_attention=prefill_attention)


def _read_prompts(path: Path) -> list[tuple[str, int | None]]:
    """Plain text (one prompt per line) or JSONL ``{"prompt": ..., "max_tokens": ...}``."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    out: list[tuple[str, int | None]] = []
    jsonl = path.suffix == ".jsonl"
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
                out.append((str(obj["prompt"]), obj.get("max_tokens")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' field") from None
        else:
            out.append((line, None))
    if not out:
        raise ValueError(f"prompts file {path} has no prompts")
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: Model,
        prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable.")] = None,
        prompts: Annotated[Path | None, typer.Option(help="Prompts file: one per line, or JSONL with 'prompt' (and optional 'max_tokens').")] = None,
        trace: Annotated[str | None, typer.Option(help="Replay a trace (bundled name or file) with random prompt tokens of its lengths.")] = None,
        num_requests: Annotated[int | None, typer.Option(help="Use the first N trace requests.")] = None,
        rate_scale: Annotated[float, typer.Option(help="Replay the trace at this multiple of its request rate.")] = 1.0,
        offline: Annotated[bool, typer.Option(help="Submit every trace request at t=0 instead of at its arrival time.")] = False,
        policy: Annotated[str, typer.Option("--policy", "-p", help="Scheduler policy: vllm, sarathi, fairbatching, prefill-first.")] = "vllm",
        max_tokens: Annotated[int, typer.Option(help="Output tokens per prompt (trace requests use the trace's output lengths).")] = 64,
        temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
        top_p: Annotated[float, typer.Option()] = 1.0,
        top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
        ignore_eos: Annotated[bool, typer.Option(help="Keep generating past EOS (trace replays always do).")] = False,
        ttft_slo: Annotated[float, typer.Option(help="TTFT SLO, seconds.")] = 1.0,
        tpot_slo: Annotated[float, typer.Option(help="TPOT SLO, seconds.")] = 0.05,
        slo_classes: Annotated[str | None, typer.Option(help='SLO class mix "name:TTFT_s:TPOT_s:share,...".')] = None,
        latency_profile: Annotated[Path | None, typer.Option("--profile", help="Latency profile JSON for the policy (default: shipped profile or roofline).")] = None,
        load_format: LoadFormat = "auto",
        dtype: Dtype = "auto",
        device: Device = None,
        attention_backend: Backend = None,
        num_kv_blocks: KVBlocks = None,
        max_model_len: MaxLen = None,
        max_num_batched_tokens: MaxTokens = 8192,
        max_num_seqs: MaxSeqs = 256,
        cuda_graphs: Graphs = True,
        piecewise_cuda_graphs: PiecewiseGraphs = False,
        attention_overlap: AttentionOverlap = False,
        prefill_attention: PrefillAttention = "triton",
        enable_prefix_caching: PrefixCaching = True,
        async_scheduling: AsyncScheduling = False,
        seed: Annotated[int, typer.Option(help="Seed for dummy weights, sampling, trace prompts and SLO draws.")] = 0,
        output: Annotated[Path | None, typer.Option(help="Write one JSON line per request here.")] = None,
        json_path: Annotated[Path | None, typer.Option("--json", help="Write the run summary (vLLM bench keys) here.")] = None,
    ) -> None:
        """Generate offline for prompts or a trace with any scheduler policy on the real engine."""
        args = dict(locals())
        if sum(x is not None for x in (prompt or None, prompts, trace)) != 1:
            raise _fail("give exactly one of --prompt, --prompts or --trace")
        try:
            _run_generate(**args)
        except (ValueError, OSError) as e:
            raise _fail(str(e)) from None

    @app.command()
    def profile(
        model: Model,
        out: Annotated[Path | None, typer.Option(help="Profile JSON to write (default: {model}_{gpu}.json).")] = None,
        samples_path: Annotated[Path | None, typer.Option("--samples", help="Also write every measured sample (JSON).")] = None,
        quick: Annotated[bool, typer.Option(help="A smaller sweep (about a quarter of the points).")] = False,
        repeats: Annotated[int, typer.Option(help="Timed repetitions per composition (median taken).")] = 3,
        load_format: LoadFormat = "auto",
        dtype: Dtype = "auto",
        device: Device = None,
        attention_backend: Backend = None,
        num_kv_blocks: KVBlocks = None,
        max_num_batched_tokens: MaxTokens = 8192,
        max_num_seqs: MaxSeqs = 256,
        cuda_graphs: Graphs = True,
        piecewise_cuda_graphs: PiecewiseGraphs = False,
        attention_overlap: AttentionOverlap = False,
        prefill_attention: PrefillAttention = "triton",
        seed: Annotated[int, typer.Option()] = 0,
    ) -> None:
        """Time real engine steps over batch compositions and fit the latency model `fairbatch simulate --profile` loads."""
        args = dict(locals())
        try:
            _run_profile(**args)
        except (ValueError, OSError) as e:
            raise _fail(str(e)) from None


def _run_generate(*, model, prompt, prompts, trace, num_requests, rate_scale, offline, policy, max_tokens,
                  temperature, top_p, top_k, ignore_eos, ttft_slo, tpot_slo, slo_classes, latency_profile,
                  load_format, dtype, device, attention_backend, num_kv_blocks, max_model_len,
                  max_num_batched_tokens, max_num_seqs, cuda_graphs, piecewise_cuda_graphs, attention_overlap,
                  prefill_attention, enable_prefix_caching, async_scheduling, seed, output, json_path) -> None:
    import numpy as np

    from fairbatch.engine.llm import LLM
    from fairbatch.engine.params import SamplingParams
    from fairbatch.metrics import format_summary_block, record_from_request, summarize
    from fairbatch.request import SLO
    from fairbatch.scheduler.base import SchedulerConfig

    lat = None
    if latency_profile is not None:
        from fairbatch.latency.profiles import load_profile

        lat = load_profile(latency_profile)
    cfg = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          ttft_slo=ttft_slo, tpot_slo=tpot_slo)
    with console.status(f"loading {model}"):
        llm = LLM(model, policy=policy, scheduler_config=cfg, latency_model=lat, async_scheduling=async_scheduling,
                  **_engine_kwargs(load_format, dtype, device, attention_backend, num_kv_blocks, max_model_len,
                                   max_num_batched_tokens, max_num_seqs, cuda_graphs, seed, enable_prefix_caching,
                                   piecewise_cuda_graphs, attention_overlap, prefill_attention))
    e = llm.engine
    console.print(f"{e.name}: {e.config.family}, {str(e.dtype).replace('torch.', '')} on {e.device}, "
                  f"attention {e.backend.name}, {e.allocator.num_blocks} KV blocks, policy {policy}, "
                  f"prefix caching {'on' if e.allocator.prefix_caching else 'off'}")
    default_slo = SLO(ttft_slo, tpot_slo)
    arrivals = []
    if trace is not None:
        from fairbatch.workload import (
            assign_slos,
            load_trace,
            parse_slo_classes,
            scale_rate,
            truncate_to_context,
        )

        entries = load_trace(trace, num_requests=num_requests, seed=seed)
        entries = scale_rate(entries, rate_scale)
        entries, changed = truncate_to_context(entries, llm.scheduler_config.max_model_len)
        if changed:
            console.print(f"[yellow]{changed} requests clipped to the {llm.scheduler_config.max_model_len}-token context[/]")
        slos = assign_slos(entries, default=default_slo,
                           classes=parse_slo_classes(slo_classes) if slo_classes else None, seed=seed)
        rng = np.random.default_rng(seed)
        vocab = e.config.vocab_size
        for i, (ent, slo) in enumerate(zip(entries, slos)):
            ids = rng.integers(0, min(vocab, 256) if vocab > 256 else vocab, size=ent.prompt_len).tolist()
            sp = SamplingParams(max_tokens=ent.output_len, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=None, ignore_eos=True)
            arrivals.append((0.0 if offline else ent.arrival, llm.make_request(ids, sp, slo=slo, request_id=f"req-{i}")))
    else:
        items = [(p, None) for p in (prompt or [])] if prompts is None else _read_prompts(prompts)
        for text, mt in items:
            sp = SamplingParams(max_tokens=int(mt or max_tokens), temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed if temperature > 0 else None, ignore_eos=ignore_eos)
            arrivals.append((0.0, llm.make_request(text, sp, slo=default_slo)))
    outs = llm.run(arrivals, progress=len(arrivals) > 1)
    if trace is None and len(outs) <= 20:
        for o in outs:
            console.print(f"[bold]{o.prompt!r}[/] -> {o.text!r}  [dim]({len(o.token_ids)} tokens, {o.finish_reason})[/]",
                          highlight=False)
    summary = summarize([record_from_request(r) for _, r in arrivals])
    a = e.allocator
    summary.update(policy=policy, model=e.name, device=str(e.device), attention_backend=e.backend.name,
                   preemptions=llm.scheduler.stats.preemptions, prefix_caching=a.prefix_caching,
                   prefix_cache_queries=a.prefix_queries, prefix_cache_hits=a.prefix_hits)
    console.print(format_summary_block(summary, title=f"fairbatch generate ({policy})"), highlight=False)
    if output is not None:
        with output.open("w") as f:
            for o in outs:
                f.write(json.dumps({"request_id": o.request_id, "prompt": o.prompt, "text": o.text,
                                    "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                    "ttft": o.ttft, "tpot": o.tpot, "num_preemptions": o.num_preemptions,
                                    "num_cached_tokens": o.num_cached_tokens}) + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")


def _run_profile(*, model, out, samples_path, quick, repeats, load_format, dtype, device, attention_backend,
                 num_kv_blocks, max_num_batched_tokens, max_num_seqs, cuda_graphs, piecewise_cuda_graphs,
                 attention_overlap, prefill_attention, seed) -> None:
    from rich.progress import Progress

    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.engine.profile import profile as run_profile

    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    with console.status(f"loading {model}"):
        engine = Engine(EngineArgs(model, **_engine_kwargs(load_format, dtype, device, attention_backend,
                                                           num_kv_blocks, None, max_num_batched_tokens,
                                                           max_num_seqs, cuda_graphs, seed,
                                                           piecewise_cuda_graphs=piecewise_cuda_graphs,
                                                           attention_overlap=attention_overlap,
                                                           prefill_attention=prefill_attention)))
    if engine.device.type != "cuda":
        console.print("[yellow]profiling on the CPU: the fitted model describes this CPU, not a GPU[/]")
    with Progress(console=console) as bar:
        task = bar.add_task("profiling", total=None)

        def tick(i: int, n: int, s) -> None:
            bar.update(task, total=n, completed=i + 1, description=f"{s.kind:8s} {s.seconds * 1e3:8.2f} ms")

        lat, samples, report = run_profile(engine, quick=quick, repeats=repeats, seed=seed, on_sample=tick)
    gpu = lat.meta["gpu"]
    path = out or Path(f"{engine.name}_{gpu}.json")
    lat.save(path)
    if samples_path is not None:
        samples_path.write_text(json.dumps([s.to_dict() for s in samples], indent=1) + "\n")
    co = lat.to_dict()["coefficients"]
    console.print(f"{len(samples)} steps measured; fit on {report['num_train']}, held out {report['num_test']}: "
                  f"median relative error {report['holdout_median_rel_err']:.1%}, "
                  f"p95 {report['holdout_p95_rel_err']:.1%}")
    console.print("coefficients: " + ", ".join(f"{k}={v:.4g}" for k, v in co.items()))
    console.print(f"wrote {path}")
