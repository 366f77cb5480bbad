"""`fairbatch bench`: replay a trace against an OpenAI-compatible server (ours, vLLM,
SGLang) and report like `vllm bench serve`, plus SLO and envelope attainment."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

GOODPUT_RE = re.compile(r"^(ttft|tpot|e2el):(.+)$")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """vLLM's ``--goodput ttft:MS tpot:MS`` -> {"ttft": seconds, "tpot": seconds}."""
    out: dict[str, float] = {}
    for item in items:
        for part in re.split(r"[\s,]+", item.strip()):
            if not part:
                continue
            m = GOODPUT_RE.match(part)
            if not m:
                raise ValueError(f"bad --goodput item {part!r}: expected ttft:MS or tpot:MS")
            name, value = m.groups()
            if name == "e2el":
                raise ValueError("--goodput e2el is not supported: SLOs here are TTFT and TPOT")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"bad --goodput item {part!r}: {value!r} is not a number of milliseconds") from None
            if not (ms > 0 and math.isfinite(ms)):
                raise ValueError(f"bad --goodput item {part!r}: must be a positive number of milliseconds")
            out[name] = ms / 1000.0
    return out


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True})
    def bench(
        ctx: typer.Context,
        base_url: Annotated[str, typer.Option(help="Server URL, e.g. http://127.0.0.1:8000.")] = "http://127.0.0.1:8000",
        model: Annotated[Optional[str], typer.Option(help="Model id; default: the server's first model.")] = None,
        trace: Annotated[str, typer.Option(help="Bundled trace (azure-conv, azure-code) or a trace file.")] = "azure-conv",
        num_prompts: Annotated[int, typer.Option(help="Requests to send: the first N of the trace (0: all).")] = 1000,
        rate_scale: Annotated[Optional[float], typer.Option(help="Replay the trace's arrivals X times faster.")] = None,
        request_rate: Annotated[Optional[float], typer.Option(help="Re-time arrivals: gamma process at R req/s (inf: all at once).")] = None,
        burstiness: Annotated[float, typer.Option(help="Gamma shape with --request-rate (1 = Poisson, < 1 burstier).")] = 1.0,
        goodput: Annotated[Optional[list[str]], typer.Option(help="vLLM style SLO for goodput: --goodput ttft:MS tpot:MS (ms).")] = None,
        ttft_slo: Annotated[Optional[float], typer.Option(help="TTFT SLO, seconds (default 1.0).")] = None,
        tpot_slo: Annotated[Optional[float], typer.Option(help="TPOT SLO, seconds (default 0.05).")] = None,
        slo_classes: Annotated[Optional[str], typer.Option(help='SLO class mix "name:TTFT_s:TPOT_s:share,...".')] = None,
        search_capacity: Annotated[bool, typer.Option("--capacity", help="Bisect the rate for the highest one with SLO attainment >= --target.")] = False,
        target: Annotated[Optional[list[float]], typer.Option(help="SLO attainment that defines capacity; repeatable. Default: 0.9 and 0.99.")] = None,
        capacity_lo: Annotated[float, typer.Option(help="First rate scale the capacity search tries.")] = 1.0,
        capacity_hi: Annotated[Optional[float], typer.Option(help="Upper rate scale of the capacity search (default: doubling).")] = None,
        rel_tol: Annotated[float, typer.Option(help="Capacity search stops when the bracket is this tight (ratio).")] = 0.05,
        max_concurrency: Annotated[Optional[int], typer.Option(help="At most this many requests in flight (with --workers 1).")] = None,
        workers: Annotated[int, typer.Option(help="Client processes sharing the schedule: one spends ~55-65 us of CPU per "
                                             "streamed token (aiohttp on uvloop); its loop's backlog adds to the "
                                             "TTFT it measures.")] = 1,
        max_model_len: Annotated[Optional[int], typer.Option(help="Truncate requests to this context (default: the server's).")] = None,
        send_slo: Annotated[bool, typer.Option(help="Send each request's SLO in its body (fairbatch servers use it).")] = True,
        extra_body: Annotated[Optional[str], typer.Option(help="JSON object merged into every request body.")] = None,
        seed: Annotated[int, typer.Option(help="Seed for prompts, SLO classes and arrival processes.")] = 0,
        prompt_salt: Annotated[int, typer.Option(min=0, help="Replay the same trace with prompts that share nothing "
                                                 "with another salt's (the trace's own sharing kept): for a server "
                                                 "whose prefix cache holds an earlier replay.")] = 0,
        timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 6 * 3600.0,
        label: Annotated[Optional[str], typer.Option(help="Name of this run in the JSON (default: the server's policy).")] = None,
        save_result: Annotated[bool, typer.Option("--save-result", help="Write the JSON result (vLLM's flag; "
                                                  "`--save-result PATH` also works).")] = False,
        result_dir: Annotated[Optional[Path], typer.Option(help="Directory of the --save-result file (default: .).")] = None,
        result_filename: Annotated[Optional[str], typer.Option(help="File name of the --save-result file (default: "
                                                               "vLLM's LABEL-RATEqps-MODEL-DATE.json).")] = None,
        save_detailed: Annotated[bool, typer.Option(help="Also save per-request lists (ttfts, itls, errors...).")] = False,
        dataset_name: Annotated[Optional[str], typer.Option(help="vLLM's dataset: random (lengths from "
                                                            "--random-input-len/--random-output-len), sharegpt or "
                                                            "custom (--dataset-path; tokenized by the server's "
                                                            "/tokenize); default: --trace.")] = None,
        random_input_len: Annotated[int, typer.Option(help="Prompt tokens with --dataset-name random.")] = 1024,
        random_output_len: Annotated[int, typer.Option(help="Output tokens with --dataset-name random.")] = 128,
        random_range_ratio: Annotated[float, typer.Option(help="Lengths uniform in [L(1-r), L(1+r)].")] = 0.0,
        dataset_path: Annotated[Optional[str], typer.Option(help="The file of --dataset-name sharegpt (JSON) or "
                                                            "custom (JSONL of {\"prompt\": ...}).")] = None,
        sharegpt_output_len: Annotated[Optional[int], typer.Option(min=1, help="Output tokens of every ShareGPT "
                                                                   "request (default: its answer's length).")] = None,
        custom_output_len: Annotated[int, typer.Option(min=1, help="Output tokens of every custom request.")] = 256,
        ignore_eos: Annotated[bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Ask for exactly the trace's "
                                                 "output lengths (default on: the lengths are the trace's).")] = True,
        percentile_metrics: Annotated[str, typer.Option(help="Latency metrics with percentiles: any of "
                                                        "ttft,tpot,itl,e2el.")] = "ttft,tpot,itl,e2el",
        metric_percentiles: Annotated[str, typer.Option(help='Percentiles to report, e.g. "50,90,99".')] = "50,90,95,99",
        max_failure_ratio: Annotated[float, typer.Option(help="Exit with status 1 when more than this fraction of "
                                                         "the requests failed (refusals, 429, not counted).")] = 0.0,
    ) -> None:
        """Replay a trace against an OpenAI-compatible server: vLLM's result block and JSON, SLO attainment, capacity."""
        from fairbatch.bench.run import BenchConfig, BenchError, prepare
        from fairbatch.cli import console, fail
        from fairbatch.workload import TraceError

        extra = list(ctx.args)
        goodput_items = list(goodput or [])
        save_path: Path | None = None
        paths = [a for a in extra if not a.startswith("-") and not GOODPUT_RE.match(a)]
        if save_result and len(paths) == 1:
            save_path = Path(paths[0])          # the older `--save-result PATH`
            extra.remove(paths[0])
        if extra:
            # `--goodput ttft:500 tpot:50` (vLLM's nargs="+" syntax): the second item lands here.
            if goodput_items and all(GOODPUT_RE.match(a) for a in extra):
                goodput_items += extra
            else:
                raise fail(f"unexpected argument(s): {' '.join(extra)}")
        if rate_scale is not None and request_rate is not None:
            raise fail("give --rate-scale or --request-rate, not both")
        try:
            gp = parse_goodput(goodput_items)
        except ValueError as e:
            raise fail(str(e)) from None
        if gp and (ttft_slo is not None or tpot_slo is not None):
            raise fail("give --goodput or --ttft-slo/--tpot-slo, not both")
        body: dict = {}
        if extra_body:
            try:
                body = json.loads(extra_body)
            except json.JSONDecodeError as e:
                raise fail(f"--extra-body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise fail("--extra-body must be a JSON object")
        try:
            percentiles = tuple(float(p) for p in metric_percentiles.split(",") if p.strip())
            metrics_asked = tuple(m.strip() for m in percentile_metrics.split(",") if m.strip())
        except ValueError:
            raise fail(f"--metric-percentiles {metric_percentiles!r}: expected numbers like 50,90,99") from None
        if not percentiles or not all(0 < p < 100 for p in percentiles):
            raise fail("--metric-percentiles must be numbers in (0, 100)")
        if bad := [m for m in metrics_asked if m not in ("ttft", "tpot", "itl", "e2el")]:
            raise fail(f"--percentile-metrics: unknown {', '.join(bad)} (choose from ttft,tpot,itl,e2el)")
        if dataset_name not in (None, "random", "sharegpt", "custom"):
            raise fail(f"--dataset-name {dataset_name!r}: choose random, sharegpt or custom (or a trace with --trace)")
        if not 0 <= max_failure_ratio <= 1:
            raise fail("--max-failure-ratio must be in [0, 1]")
        if not save_result and (result_dir is not None or result_filename is not None):
            raise fail("--result-dir/--result-filename need --save-result")
        targets = tuple(sorted(target or (0.9, 0.99)))
        if not all(0 < t <= 1 for t in targets):
            raise fail("--target must be in (0, 1]")
        cfg = BenchConfig(
            base_url=base_url, model=model, trace=trace, num_prompts=num_prompts or None,
            rate_scale=rate_scale if rate_scale is not None else 1.0, request_rate=request_rate,
            burstiness=burstiness, ttft_slo=gp.get("ttft", ttft_slo if ttft_slo is not None else 1.0),
            tpot_slo=gp.get("tpot", tpot_slo if tpot_slo is not None else 0.05), slo_classes=slo_classes,
            max_model_len=max_model_len, max_concurrency=max_concurrency, send_slo=send_slo, seed=seed,
            prompt_salt=prompt_salt,
            timeout=timeout, label=label, extra_body=body, workers=workers, ignore_eos=ignore_eos,
            dataset_name=dataset_name, random_input_len=random_input_len, random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, dataset_path=dataset_path, sharegpt_output_len=sharegpt_output_len,
            custom_output_len=custom_output_len, percentiles=percentiles, percentile_metrics=metrics_asked,
            goodput=bool(gp or ttft_slo is not None or tpot_slo is not None or slo_classes))
        try:
            wl = prepare(cfg)
            if save_result and save_path is None:
                save_path = result_path(cfg, wl, result_dir, result_filename)
            report = run_bench(cfg, wl, search_capacity=search_capacity, targets=targets, lo=capacity_lo,
                               hi=capacity_hi, rel_tol=rel_tol, save_result=save_path, detailed=save_detailed,
                               console=console)
        except (BenchError, TraceError, ValueError, OSError) as e:
            raise fail(str(e)) from None
        failed = report["failed"] - report.get("rejected", 0)
        sent = report["completed"] + report["failed"]
        if sent and failed / sent > max_failure_ratio:
            console.print(f"{failed} of {sent} requests failed, more than --max-failure-ratio "
                          f"{max_failure_ratio:g}", highlight=False)
            raise typer.Exit(1)


def result_path(cfg, wl, result_dir: Path | None, result_filename: str | None) -> Path:
    """Where --save-result writes: vLLM's directory and default name."""
    from fairbatch.bench.vllm_compat import result_filename as default_name

    rate = cfg.request_rate if cfg.request_rate is not None else wl.base_rate * cfg.rate_scale
    # vLLM names the file by --label, else by its backend ("openai"), never by the server
    name = result_filename or default_name(cfg.label or "openai", rate, cfg.max_concurrency, wl.model)
    return (result_dir or Path(".")) / name


def run_bench(cfg, wl, *, search_capacity: bool, targets: tuple[float, ...], lo: float, hi: float | None, rel_tol: float,
              save_result: Path | None, detailed: bool, console) -> dict:
    """Run (or search capacity), print the result block(s), write the JSON; returns it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fairbatch.bench.run import result_json, run_capacity, run_once
    from fairbatch.metrics import format_summary_block

    n = len(wl.requests)
    rate = wl.base_rate * cfg.rate_scale
    how = (f"gamma arrivals at {cfg.request_rate:g} req/s (burstiness {cfg.burstiness:g})"
           if cfg.request_rate is not None else f"trace arrivals x{cfg.rate_scale:g} = {rate:.2f} req/s")
    slo = f"classes {cfg.slo_classes}" if cfg.slo_classes else f"TTFT {cfg.ttft_slo:g}s / TPOT {cfg.tpot_slo * 1e3:g}ms"
    console.print(f"[bold]{cfg.trace}[/]: {n} requests to {cfg.base_url} ({wl.model}), {how}, SLO {slo}"
                  + (f"; {wl.truncated} truncated to the context" if wl.truncated else ""), highlight=False)

    progress_console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                  TimeElapsedColumn(), console=progress_console, transient=True) as bar:
        task = bar.add_task("requests", total=n, failed=0)
        failed = [0]

        def on_done(rec) -> None:
            if not rec.success:
                failed[0] += 1
            bar.update(task, advance=1, failed=failed[0])

        def reset(desc: str) -> None:
            failed[0] = 0
            bar.reset(task, total=n, description=desc, failed=0)

        if search_capacity:
            def on_point(scale: float, r: float, summary: dict) -> None:
                bar.console.print(f"  rate x{scale:.3f} ({r:.2f} req/s): SLO attainment {summary['slo_attainment']:.1%}, "
                                  f"failed {summary['failed']}", highlight=False)
                reset("requests (next point)")

            reset(f"requests at x{lo:g}")
            res, outcomes = run_capacity(cfg, wl, targets=targets, lo=lo, hi=hi, rel_tol=rel_tol,
                                         on_point=on_point, on_done=on_done)
            loosest = res[targets[0]]
            best = loosest.rate_scale if loosest.rate_scale in outcomes else min(outcomes)
            outcome = outcomes[best]
            runs = [{"policy": cfg.label or _label(wl), **outcomes[s].summary} for s in sorted(outcomes)]
            cap = {str(t): c.to_dict() for t, c in res.items()}
        else:
            reset("requests")
            outcome = run_once(cfg, wl, cfg.rate_scale, on_done)
            runs, cap, res = None, None, None

    s = outcome.summary
    s_print = dict(s)
    if cfg.max_concurrency is not None:
        s_print["max_concurrency"] = cfg.max_concurrency
    console.print(format_summary_block(s_print), highlight=False, markup=False)
    if s.get("failure_reasons"):
        console.print("Failed requests by reason:", highlight=False)
        for reason, count in s["failure_reasons"].items():
            console.print(f"  {count:>6d}  {reason}", highlight=False, markup=False)
    for line in prefix_lines(s):
        console.print(line, highlight=False, markup=False)
    if res is not None:
        for t, c in res.items():
            console.print(f"capacity (SLO attainment >= {t:.0%}, every request counted): {c.request_rate:.2f} req/s "
                          f"(rate scale x{c.rate_scale:.3f}, {c.status})", highlight=False)
    report = result_json(cfg, wl, outcome, detailed=detailed, runs=runs, capacity=cap)
    if save_result is not None:
        save_result.parent.mkdir(parents=True, exist_ok=True)
        save_result.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
        console.print(f"wrote {save_result}")
    return report


def prefix_lines(s: dict) -> list[str]:
    """The prefix-sharing lines of a run's summary (none when nothing is shared or reported)."""
    out = []
    if s.get("shared_prompt_tokens"):
        out.append(f"Prefix sharing: the prompts share {s['shared_prompt_tokens']} tokens "
                   f"({s['shared_prompt_ratio']:.1%} of all; what an unbounded cache of the server's blocks reuses)")
    if s.get("cached_prompt_tokens") is not None:
        rate = s.get("prefix_cache_hit_rate")
        out.append(f"Server prefix cache: {s['cached_prompt_tokens']} prompt tokens cached, hit rate "
                   f"{'n/a' if rate is None else format(rate, '.1%')} ({s['cached_reported']} requests reported "
                   f"cached_tokens)")
    return out


def _label(wl) -> str:
    return (wl.server_info.get("fairbatch") or {}).get("policy") or "server"


def _jsonable(x):
    return str(x)
