"""Prefix-cache hit rate: the simulator's prediction against the engine's, on the same requests.

    python benchmarks/sim/prefix_hit_fidelity.py --trace multi-turn --num 300 --blocks 0 --blocks 600 \
        --mode sequential --mode lockstep --mode burst --mode replay --replay-scale 0.25
    python benchmarks/sim/prefix_hit_fidelity.py --trace mooncake --num 60 --max-prompt 16000 --blocks 0 \
        --blocks 2000 --mode sequential --mode lockstep --mode burst --mode replay

A window of a trace with ``hash_ids`` runs twice, with the same block size (16), KV block
count, scheduler config and policy:

- in the simulator (``sim.experiment.prepare`` + ``run_policy``, ``num_blocks`` replaced):
  each request named by ``kv.trace_block_hashes`` of its hash ids;
- in the real engine (``engine.llm.LLM``, dummy weights, CPU, float32, one thread): each
  request's prompt is the token ids ``fairbatch bench`` sends for its hash ids
  (``bench.prefix_prompts.trace_prompt``), named by the engine itself
  (``kv.prompt_block_hashes`` of the tokens). The model is ``tiny-llama``'s shape with a
  longer context (a ``config.json`` written to a temporary folder; ``tiny-llama`` itself
  stops at 2,048 tokens and the traces' prompts do not).

Outputs are capped (``--max-output``) and run to their length (``ignore_eos``); output
blocks are never named, so the cap changes only KV pressure, equally on both sides.

Modes: ``sequential`` (each request runs alone, after the previous one finished: the
engine one ``LLM.run`` per request, the simulator arrivals 10^4 s apart), ``lockstep``
(every request arrives at time 0, and the engine is driven in the simulator's order of
events: the loop starts an idle instance's step at the first arrival, before the arrivals
tied with it are added), ``burst`` (every request at time 0, the engine through
``LLM.run``, which adds every request that has arrived before its first step), ``replay`` (the trace's arrival times,
multiplied by ``--replay-scale``: the engine on its wall clock, the simulator on its
latency model's clock; the two clocks differ, so this is where timing shows).

``--blocks 0`` means enough blocks that nothing is ever evicted (the sum of every
request's blocks). The policy defaults to ``vllm`` with ``late=serve``: its decisions read
no clock, so in ``burst`` the engine and the simulator take the same steps.

Prints, per (blocks, mode): prompt tokens queried and hit on each side (the allocators'
``prefix_queries`` / ``prefix_hits``; the simulator's ``prefix_cache_hit_rate`` is their
ratio), requests whose cached tokens differ, and the bench's count for an unbounded cache
(``shared_prompt_tokens``) from the hash ids and from the token ids.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fairbatch.bench.prefix_prompts import prompt_key, shared_prompt_tokens, trace_prompt
from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.request import DeadlineRule
from fairbatch.scheduler.base import make_scheduler
from fairbatch.scheduler.variant import parse_variant
from fairbatch.sim.executor import SimExecutor
from fairbatch.sim.experiment import BLOCK_SIZE, Prepared, Scenario, prepare, run_policy
from fairbatch.sim.loop import simulate
from fairbatch.specs import get_model
from fairbatch.workload import TraceEntry, make_requests

SEQUENTIAL_GAP = 1e4      # seconds between simulated arrivals in sequential mode


@dataclass
class Side:
    queries: int
    hits: int
    cached: list[int]        # per request, tokens found cached at first admission
    seconds: float
    steps: int = 0
    preemptions: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def window(trace: str, num: int, max_prompt: int, max_output: int, context: int, policy_late: str,
           max_num_batched_tokens: int) -> Prepared:
    """The first ``num`` requests of ``trace`` with prompts of at most ``max_prompt`` tokens
    (others dropped: what remains is still a consistent workload, the names say what it
    shares), outputs capped at ``max_output``; the simulator's scenario for them."""
    sc = Scenario(trace=trace, model="tiny-llama", max_model_len=context,
                  scheduler={"late": policy_late, "max_num_batched_tokens": max_num_batched_tokens})
    prep = prepare(sc)
    if prep.block_hashes is None:
        raise SystemExit(f"trace {trace!r} carries no hash_ids: nothing to compare")
    keep = [i for i, e in enumerate(prep.entries) if e.prompt_len <= max_prompt][:num]
    entries = [replace(prep.entries[i], output_len=min(prep.entries[i].output_len, max_output)) for i in keep]
    return replace(prep, entries=entries, slos=[prep.slos[i] for i in keep],
                   block_hashes=[prep.block_hashes[i] for i in keep])


def timed(prep: Prepared, mode: str, replay_scale: float) -> list[TraceEntry]:
    """The window's entries with the arrivals of ``mode``."""
    if mode == "sequential":
        return [replace(e, arrival=i * SEQUENTIAL_GAP) for i, e in enumerate(prep.entries)]
    if mode in ("burst", "lockstep"):
        return [replace(e, arrival=0.0) for e in prep.entries]
    t0 = prep.entries[0].arrival
    return [replace(e, arrival=(e.arrival - t0) * replay_scale) for e in prep.entries]


def run_sim(prep: Prepared, policy: str, num_blocks: int, entries: list[TraceEntry]) -> tuple[Side, float]:
    """-> (per-request side, run_policy's prefix_cache_hit_rate for the same run)."""
    p = replace(prep, entries=entries, num_blocks=num_blocks)
    t0 = time.process_time()
    rate = run_policy(p, policy).summary["prefix_cache_hit_rate"]
    # the same run again, built as run_policy builds it, to read each request and the allocator
    variant = parse_variant(policy)
    alloc = BlockAllocator(num_blocks, BLOCK_SIZE, prefix_caching=True)
    inst = Instance(make_scheduler(variant.name, variant.config(p.config), alloc, p.latency), SimExecutor(p.latency))
    reqs = make_requests(entries, p.slos, deadline_rule=DeadlineRule(p.scenario.deadline_rule))
    for r, names in zip(reqs, p.block_hashes, strict=True):
        r.block_hashes = names
    out = simulate(reqs, [inst])
    alloc.check_invariants()
    side = Side(alloc.prefix_queries, alloc.prefix_hits, [r.num_cached_tokens for r in reqs],
                time.process_time() - t0, sum(out.steps), out.preemptions)
    return side, rate


def model_dir(context: int) -> Path:
    """``tiny-llama``'s shape with a ``context``-token context, as a Hugging Face folder."""
    d = Path(tempfile.mkdtemp(prefix="tiny-llama-long-"))
    hf = get_model("tiny-llama").to_hf_config()
    hf["max_position_embeddings"] = context
    (d / "config.json").write_text(json.dumps(hf))
    return d


def lockstep(llm, reqs: list) -> None:
    """Every request arrives at 0, in the simulator's order of events (``sim.loop``: an
    idle instance starts a step at the first arrival, before the arrivals tied with it are
    added): the first request is added and its step begun, then the others are added, and
    the engine steps until all finish. The clock is a step count: ``late=serve`` and
    ``vllm`` read none."""
    inst = llm.instance
    for r in reqs:
        r.set_arrival(0.0)
    inst.add(reqs[0], 0.0)
    plan, result = inst.begin_step(0.0)
    for r in reqs[1:]:
        inst.add(r, 0.0)
    t = 1.0
    inst.end_step(plan, result, t)
    while inst.has_work():
        plan, result = inst.begin_step(t)
        t += 1.0
        inst.end_step(plan, result, t)


def run_engine(prep: Prepared, policy: str, num_blocks: int, entries: list[TraceEntry], mode: str,
               model: Path, key: int) -> Side:
    from fairbatch.engine.llm import LLM
    from fairbatch.engine.params import SamplingParams

    cfg = parse_variant(policy).config(prep.config)
    llm = LLM(str(model), policy=parse_variant(policy).name, scheduler_config=cfg, latency_model=prep.latency,
              load_format="dummy", dtype="float32", device="cpu", num_kv_blocks=num_blocks,
              block_size=BLOCK_SIZE, max_num_batched_tokens=cfg.max_num_batched_tokens,
              max_num_seqs=cfg.max_num_seqs, cuda_graphs=False)
    reqs = [llm.make_request(trace_prompt(e.hash_ids, e.prompt_len, key),
                             SamplingParams(max_tokens=e.output_len, ignore_eos=True, temperature=0.0))
            for e in entries]
    t0 = time.perf_counter()
    if mode == "sequential":
        for r in reqs:
            llm.run([(0.0, r)])
    elif mode == "lockstep":
        lockstep(llm, reqs)
    else:
        llm.run([(e.arrival, r) for e, r in zip(entries, reqs)])
    wall = time.perf_counter() - t0
    a = llm.engine.allocator
    a.check_invariants()
    bad = [r.request_id for r in reqs if len(r.output_token_ids) != r.max_new_tokens]
    if bad:
        raise SystemExit(f"engine requests ended early: {bad[:5]}")
    return Side(a.prefix_queries, a.prefix_hits, [r.num_cached_tokens for r in reqs], wall,
                preemptions=sum(r.num_preemptions for r in reqs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="multi-turn", help="a trace with hash_ids: multi-turn, mooncake")
    ap.add_argument("--num", type=int, default=300, help="requests in the window")
    ap.add_argument("--max-prompt", type=int, default=16000, help="drop longer prompts (CPU time)")
    ap.add_argument("--max-output", type=int, default=8, help="cap output lengths (CPU time)")
    ap.add_argument("--context", type=int, default=16384, help="context of the engine's model and the simulator")
    ap.add_argument("--policy", default="vllm")
    ap.add_argument("--late", default="serve", help="the late mode of every run (serve: no clock in vllm's decisions)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--blocks", type=int, action="append", help="KV blocks; 0 = never evict (repeatable)")
    ap.add_argument("--mode", action="append", choices=["sequential", "burst", "lockstep", "replay"])
    ap.add_argument("--replay-scale", type=float, default=1.0, help="multiply the trace's arrival times (replay)")
    ap.add_argument("--seed", type=int, default=0, help="the bench's key for the prompts' token ids")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)

    prep = window(args.trace, args.num, args.max_prompt, args.max_output, args.context, args.late,
                  args.max_num_batched_tokens)
    entries = prep.entries
    key = prompt_key(args.seed)
    prompt_tokens = sum(e.prompt_len for e in entries)
    uncovered = sum(len(e.hash_ids) * 512 < e.prompt_len for e in entries)
    bench_ids = shared_prompt_tokens([(e.hash_ids, None, e.prompt_len) for e in entries], BLOCK_SIZE)
    bench_tok = shared_prompt_tokens([(None, trace_prompt(e.hash_ids, e.prompt_len, key), e.prompt_len)
                                      for e in entries], BLOCK_SIZE)
    never_evict = sum(-(-(e.prompt_len + e.output_len) // BLOCK_SIZE) for e in entries)
    largest = max(-(-(e.prompt_len + e.output_len) // BLOCK_SIZE) for e in entries)
    print(f"{args.trace}: {len(entries)} requests, {prompt_tokens} prompt tokens (max {max(e.prompt_len for e in entries)}),"
          f" outputs <= {args.max_output}; {uncovered} prompts longer than their hash ids; policy {args.policy}, "
          f"late={args.late}; never-evict cache {never_evict} blocks, largest request {largest}")
    print(f"bench, unbounded cache: {bench_ids} shared tokens from hash ids, {bench_tok} from token ids "
          f"({bench_ids / prompt_tokens:.4f})")
    model = model_dir(args.context)
    rows = []
    hdr = (f"{'blocks':>7s} {'mode':10s} {'queried':>8s} {'sim hits':>9s} {'eng hits':>9s} {'sim rate':>8s} "
           f"{'eng rate':>8s} {'differ':>6s} {'sim pre':>7s} {'eng pre':>7s} {'sim cpu':>7s} {'eng s':>6s}")
    print(hdr)
    for blocks in args.blocks or [0]:
        n = blocks or never_evict
        for mode in args.mode or ["sequential"]:
            ent = timed(prep, mode, args.replay_scale)
            sim, rate = run_sim(prep, args.policy, n, ent)
            eng = run_engine(prep, args.policy, n, ent, mode, model, key)
            differ = sum(a != b for a, b in zip(sim.cached, eng.cached))
            if abs(rate - sim.rate) > 1e-12:
                raise SystemExit(f"run_policy's hit rate {rate} != the allocator's {sim.rate}")
            row = {"trace": args.trace, "requests": len(entries), "blocks": n, "mode": mode, "policy": args.policy,
                   "sim_queries": sim.queries, "sim_hits": sim.hits, "engine_queries": eng.queries,
                   "engine_hits": eng.hits, "sim_hit_rate": sim.rate, "engine_hit_rate": eng.rate,
                   "requests_differing": differ, "sim_preemptions": sim.preemptions,
                   "engine_preemptions": eng.preemptions, "bench_shared": bench_ids, "sim_cpu_s": sim.seconds,
                   "engine_wall_s": eng.seconds}
            rows.append(row)
            q = sim.queries if sim.queries == eng.queries else f"{sim.queries}/{eng.queries}"
            print(f"{n:7d} {mode:10s} {q!s:>8s} {sim.hits:9d} {eng.hits:9d} {sim.rate:8.4f} {eng.rate:8.4f} "
                  f"{differ:6d} {sim.preemptions:7d} {eng.preemptions:7d} {sim.seconds:7.2f} {eng.seconds:6.1f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
