"""The `fairbatch` command line: simulate | generate | profile | serve | bench | route ...

Each substrate registers its own commands; a user error anywhere prints one line and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fairbatch import cli_checks as check
from fairbatch.request import DeadlineRule

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FairBatching: SLO-aware LLM serving — simulator, engine, server, benchmark client.")
console = Console()
err_console = Console(stderr=True)

# Packages that add commands; one missing (its extra not installed) just adds none.
_COMMAND_MODULES = ("fairbatch.engine.commands", "fairbatch.server.commands", "fairbatch.bench.commands",
                    "fairbatch.cluster.commands")


def _print_version(value: bool) -> None:
    if value:
        from fairbatch import __version__

        console.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    """FairBatching: SLO-aware LLM serving."""


def fail(message: str) -> typer.Exit:
    # The message quotes what the user typed (paths, class specs): escaped, and no emoji
    # codes, so "[/]x.csv" or "a:x:0.03" print as typed instead of as rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, emoji=False)
    return typer.Exit(2)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, emoji=False)


def listen_or_fail(host: str, port: int) -> Any:
    """A listening socket on ``host:port`` for a server command, or one clear error line."""
    from fairbatch.server.runner import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@app.command()
def simulate(
    trace: Annotated[str, typer.Option(help="Bundled trace name (azure-conv, azure-code, mooncake) or a trace file.")] = "azure-conv",
    policy: Annotated[Optional[list[str]], typer.Option("--policy", "-p", help="Policy to run, or a variant with its own settings (sarathi:chunk_size=1536); repeat for several. Default: the fair comparison (docs/RESULTS.md).")] = None,
    late: Annotated[Optional[str], typer.Option(help="Late requests, the same for every policy: serve, relegate or reject (docs/ALGORITHM.md).")] = None,
    rate_scale: Annotated[Optional[float], typer.Option(help="Multiply the trace's request rate by this. Default: near the baselines' capacity for the bundled traces, else 1.")] = None,
    search_capacity: Annotated[bool, typer.Option("--capacity", help="Bisect for each policy's capacity (highest rate with SLO attainment >= target).")] = False,
    target: Annotated[Optional[list[float]], typer.Option(callback=check.fractions, help="SLO attainment that defines capacity, in (0, 1]; repeatable. Default: 0.9 and 0.99.")] = None,
    sweep: Annotated[bool, typer.Option(help="Also run 0.8x and 1.2x the rate, for the attainment-vs-rate plot.")] = True,
    ttft_slo: Annotated[float, typer.Option(help="TTFT SLO, seconds.")] = 1.0,
    tpot_slo: Annotated[float, typer.Option(help="TPOT SLO, seconds.")] = 0.05,
    slo_classes: Annotated[Optional[str], typer.Option(help='SLO class mix "name:TTFT_s:TPOT_s:share,...".')] = None,
    slo_by_tag: Annotated[Optional[str], typer.Option(help='SLO class from the trace\'s tag, e.g. "API log=batch:5:0.15,Conversation log=chat:1:0.05".')] = None,
    deadline_rule: Annotated[DeadlineRule, typer.Option(help="Per-token deadlines (docs/ALGORITHM.md).")] = DeadlineRule.TPOT_SAFE,
    num_requests: Annotated[Optional[int], typer.Option(help="Use only the first N requests of the trace.")] = None,
    request_rate: Annotated[Optional[float], typer.Option(callback=check.positive, help="Re-time arrivals at this mean rate (req/s, > 0); needed for lengths-only traces.")] = None,
    burstiness: Annotated[float, typer.Option(help="Gamma shape of re-timed arrivals: 1 = Poisson, < 1 burstier.")] = 1.0,
    instances: Annotated[int, typer.Option(help="Number of instances behind a router.")] = 1,
    router: Annotated[str, typer.Option(help="round_robin, least_requests, llumnix or admission.")] = "round_robin",
    load_interval: Annotated[float, typer.Option(callback=check.non_negative, help="How stale the router's view of instance loads may be, seconds (>= 0).")] = 0.0,
    model: Annotated[str, typer.Option(help="Model preset.")] = "llama-3-8b",
    gpu: Annotated[str, typer.Option(help="GPU preset.")] = "h100",
    profile: Annotated[Optional[Path], typer.Option(help="Latency profile JSON (from `fairbatch profile`).")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context limit; longer requests are truncated.")] = None,
    set_option: Annotated[Optional[list[str]], typer.Option("--set", help="Scheduler option KEY=VALUE for every policy run, e.g. late=serve; repeatable (a policy's own options go in its variant: sarathi:chunk_size=512).")] = None,
    prefix_caching: Annotated[bool, typer.Option("--prefix-caching/--no-prefix-caching", help="Reuse the KV of prompt prefixes the trace names as shared (Mooncake hash ids), as vLLM does by default (docs/PREFIX_CACHING.md). No effect on traces without them.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for SLO class draws and arrival processes.")] = 0,
    jobs: Annotated[int, typer.Option(help="Parallel simulation processes.")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", callback=check.output_file, help="Write the JSON report here.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the JSON report and plots.")] = Path("fairbatch-out"),
) -> None:
    """Simulate policies on a trace: TTFT/TPOT percentiles, SLO and envelope attainment, goodput, capacity."""
    from fairbatch.sim.command import DEFAULT_POLICIES, default_jobs, run_simulate
    from fairbatch.sim.experiment import Scenario
    from fairbatch.scheduler.variant import parse_variant

    policies = list(policy or DEFAULT_POLICIES)
    targets = tuple(sorted(target or (0.9, 0.99)))
    if profile is not None and (why := check.profile_mismatch(profile, model, gpu)):
        warn(why)
    try:
        for p in policies:
            parse_variant(p)
        if not all(0 < t <= 1 for t in targets):
            raise ValueError(f"--target must be in (0, 1], got {list(targets)}")
        sc = Scenario(trace=trace, num_requests=num_requests, request_rate=request_rate, burstiness=burstiness,
                      model=model, gpu=gpu,
                      profile=str(profile) if profile else None, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                      slo_classes=slo_classes, slo_by_tag=slo_by_tag, deadline_rule=deadline_rule.value,
                      instances=instances, router=router, load_interval=load_interval,
                      max_model_len=max_model_len, seed=seed,
                      scheduler=scheduler_options(set_option, late), prefix_caching=prefix_caching)
        run_simulate(sc, policies, rate_scale, search_capacity=search_capacity, sweep=sweep, targets=targets,
                     jobs=jobs or default_jobs(), out=out, json_path=json_path, console=console)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None


@app.command()
def tune(
    policy: Annotated[str, typer.Option("--policy", "-p", help="Token-budget policy to tune: sarathi (chunk_size) or vllm (max_num_batched_tokens).")] = "sarathi",
    grid: Annotated[Optional[str], typer.Option(help="Budget values, comma-separated. Default: 256..4096 for sarathi, 512..8192 for vllm.")] = None,
    late: Annotated[Optional[str], typer.Option(help="Late requests: serve, relegate or reject (as the policies it is compared with).")] = None,
    trace: Annotated[str, typer.Option(help="Bundled trace name (azure-conv, azure-code) or a trace file.")] = "azure-conv",
    num_requests: Annotated[Optional[int], typer.Option(help="Use only the first N requests of the trace.")] = None,
    ttft_slo: Annotated[float, typer.Option(help="TTFT SLO, seconds.")] = 1.0,
    tpot_slo: Annotated[float, typer.Option(help="TPOT SLO, seconds.")] = 0.05,
    slo_classes: Annotated[Optional[str], typer.Option(help='SLO class mix "name:TTFT_s:TPOT_s:share,...".')] = None,
    model: Annotated[str, typer.Option(help="Model preset.")] = "llama-3-8b",
    gpu: Annotated[str, typer.Option(help="GPU preset.")] = "h100",
    profile: Annotated[Optional[Path], typer.Option(help="Latency profile JSON (from `fairbatch profile` or a server's GET /profile).")] = None,
    set_option: Annotated[Optional[list[str]], typer.Option("--set", help="Scheduler option KEY=VALUE, one the policy reads; repeatable.")] = None,
    target: Annotated[Optional[list[float]], typer.Option(callback=check.fractions, help="SLO attainment targets, in (0, 1]; repeatable. Default: 0.9 and 0.99.")] = None,
    jobs: Annotated[int, typer.Option(help="Parallel simulation processes.")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", callback=check.output_file, help="Write the JSON report here.")] = None,
) -> None:
    """Sweep a baseline's token budget: capacity at each value, and the best (compare against that)."""
    from fairbatch.scheduler.base import check_policy_options
    from fairbatch.sim.command import default_jobs
    from fairbatch.sim.experiment import Scenario
    from fairbatch.sim.tune import print_tune, tune as run_tune, write_tune

    if profile is not None and (why := check.profile_mismatch(profile, model, gpu)):
        warn(why)
    try:
        values = tuple(int(v) for v in grid.split(",")) if grid else None
    except ValueError:
        raise fail(f"bad --grid {grid!r}: expected comma-separated token counts") from None
    try:
        options = scheduler_options(set_option, late)
        check_policy_options(policy, options)     # one policy: --set names only options it reads
        sc = Scenario(trace=trace, num_requests=num_requests, model=model, gpu=gpu,
                      profile=str(profile) if profile else None, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                      slo_classes=slo_classes, scheduler=options)
        report = run_tune(sc, policy, grid=values, targets=tuple(sorted(target or (0.9, 0.99))),
                          jobs=jobs or default_jobs())
        print_tune(report, console)
        if json_path is not None:
            write_tune(report, json_path)
            console.print(f"wrote {json_path}")
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None


def scheduler_options(items: list[str] | None, late: str | None) -> dict[str, object]:
    """``--set`` overrides plus ``--late``, validated."""
    from fairbatch.scheduler.late import Late

    opts = parse_options(items or [])
    if late is not None:
        opts["late"] = Late.parse(late).value
    return opts


def parse_options(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` scheduler overrides; values are parsed as JSON when they can be."""
    import json

    opts: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad --set {item!r}: expected KEY=VALUE")
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    return opts


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + ".") or e.name.split(".")[0] != "fairbatch"):
                continue   # not written yet, or its optional dependencies are not installed
            raise
        module.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
