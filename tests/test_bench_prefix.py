"""`fairbatch bench` reproduces a trace's shared prefixes: prompts built from Mooncake
``hash_ids`` (the same id, the same 512 tokens), the sharing the bench counts, the hit
rate a server reports (``usage.prompt_tokens_details.cached_tokens``) read back, and
capacity points that share nothing with each other."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fairbatch.bench.prefix_prompts import (  # noqa: E402
    TOKEN_HIGH,
    TOKEN_LOW,
    prompt_key,
    shared_prompt_tokens,
    trace_prompt,
)
from fairbatch.bench.run import BenchConfig, prepare, run_once, with_salt  # noqa: E402
from fairbatch.bench.vllm_compat import normalize_arrivals  # noqa: E402
from fairbatch.cli import app as cli  # noqa: E402
from fairbatch.kv import prompt_block_hashes  # noqa: E402
from fairbatch.server.runner import ServerThread  # noqa: E402
from fairbatch.workload import TraceEntry  # noqa: E402


# --- prompts from hash ids ---------------------------------------------------------------------------
def test_the_same_hash_id_gives_the_same_block() -> None:
    a = trace_prompt([1, 2, 3], 1400)
    b = trace_prompt([1, 2, 4], 1300)
    assert len(a) == 1400 and len(b) == 1300
    assert a[:1024] == b[:1024] and a[1024:1300] != b[1024:1300]
    assert all(TOKEN_LOW <= t <= TOKEN_HIGH for t in a)
    assert trace_prompt([7, 1], 1024)[512:] == a[:512]           # a block depends on its id only ...
    assert trace_prompt([1], 300) == a[:300]                     # ... and the last block is cut
    assert trace_prompt([1, 2, 3], 1400, prompt_key(0, 1)) != a  # another key: another prompt
    assert trace_prompt([1, 2, 3], 1400, prompt_key(0, 0)) == trace_prompt([1, 2, 3], 1400, prompt_key(0, 0))
    assert len(trace_prompt([5], 1200)) == 1200                   # longer than its ids: private blocks
    assert trace_prompt([5], 1200)[:512] == trace_prompt([5, 6], 1200)[:512]


def test_shared_tokens_counts_whole_blocks_of_prefixes_seen_before() -> None:
    p1 = ([1, 2], trace_prompt([1, 2], 1000), 1000)
    p2 = ([1, 2, 3], trace_prompt([1, 2, 3], 1100), 1100)      # shares p1's 1000: 62 full blocks of 16
    p3 = ([9], trace_prompt([9], 100), 100)
    assert shared_prompt_tokens([p1, p2, p3]) == 62 * 16
    assert shared_prompt_tokens([p1, p1]) == 62 * 16             # 999 // 16 = 62: the last token computed
    p4 = ([1, 2], trace_prompt([1, 2], 992), 992)                # 62 full blocks, all held: the 62nd recomputed
    assert shared_prompt_tokens([p1, p4]) == 61 * 16
    ids = list(range(3, 67))
    assert shared_prompt_tokens([(None, ids, 64), (None, ids + [5] * 20, 84)]) == 64   # named from tokens


def test_arrival_rescaling_keeps_hash_ids() -> None:
    es = [TraceEntry(0.0, 10, 2, None, (1,)), TraceEntry(2.0, 10, 2, None, (1, 2))]
    assert [e.hash_ids for e in normalize_arrivals(es, 2.0)] == [(1,), (1, 2)]


# --- against a server with an exact prefix cache -----------------------------------------------------
def _caching_app(block: int = 16) -> FastAPI:
    """A fake server with an unbounded, exact prefix cache of ``block``-token blocks: it
    answers ``cached_tokens`` in the final usage as vLLM and fairbatch do, and names its
    block size in ``/v1/models`` as fairbatch does."""
    app = FastAPI()
    app.state.seen = set()
    app.state.prompts = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 1 << 16,
                                            "fairbatch": {"block_size": block}}]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        ids = body["prompt"]
        app.state.prompts.append(ids)
        names = prompt_block_hashes(ids, block)
        held = 0
        while held < len(names) and names[held] in app.state.seen:
            held += 1
        app.state.seen.update(names)
        cached = min(held, (len(ids) - 1) // block) * block     # the last token's block is computed
        n = body["max_tokens"]

        async def gen():      # one event carries all n tokens (usage says how many)
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": "x" * n, "finish_reason": None}]}) + "\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": n,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def _mooncake(path, rows) -> None:
    path.write_text("".join(json.dumps({"timestamp": 10 * i, "input_length": n, "output_length": 2, "hash_ids": h})
                            + "\n" for i, (n, h) in enumerate(rows)))


ROWS = [(1200, [0, 1, 2]), (1500, [0, 1, 3]), (700, [10, 11]), (1100, [0, 1, 2]), (600, [10, 12]), (300, [20])]


def test_sharing_is_counted_in_the_server_block_size(tmp_path) -> None:
    path = tmp_path / "mooncake.jsonl"
    _mooncake(path, ROWS)
    with ServerThread(_caching_app(block=32), log_level="critical") as s:
        cfg = BenchConfig(base_url=s.url, trace=str(path), num_prompts=None, warmup=False, max_concurrency=1)
        wl = prepare(cfg)
        # #1: 1024 (two trace blocks); #3: 1100 tokens -> 34 full blocks of 32 = 1088; #4: 512
        assert wl.shared_tokens == 1024 + 34 * 32 + 512
        assert run_once(cfg, wl).summary["cached_prompt_tokens"] == wl.shared_tokens


@pytest.fixture
def served(tmp_path):
    """The caching fake server, and a Mooncake-format trace of ``ROWS`` (``served.trace``)."""
    path = tmp_path / "mooncake.jsonl"
    _mooncake(path, ROWS)
    with ServerThread(_caching_app(), log_level="critical") as s:
        s.trace = str(path)
        yield s


def test_server_sees_the_trace_sharing_and_bench_reports_it(served) -> None:
    cfg = BenchConfig(base_url=served.url, trace=served.trace, num_prompts=None, warmup=False, max_concurrency=1,
                      rate_scale=100.0)
    wl = prepare(cfg)
    assert [r.prompt_len for r in wl.requests] == [n for n, _ in ROWS]
    # #1: two blocks of #0 (1024); #3: its 68 full 16-token blocks, all #0's; #4: a block of #2
    assert wl.shared_tokens == 1024 + 68 * 16 + 512
    out = run_once(cfg, wl, rate_scale=100.0)
    assert out.summary["completed"] == len(ROWS)
    assert out.summary["cached_prompt_tokens"] == wl.shared_tokens
    assert out.summary["cached_reported"] == len(ROWS)
    assert out.summary["prefix_cache_hit_rate"] == pytest.approx(wl.shared_tokens / sum(n for n, _ in ROWS))
    assert out.summary["shared_prompt_ratio"] == out.summary["prefix_cache_hit_rate"]
    assert served.app.state.prompts[0] == trace_prompt([0, 1, 2], 1200, prompt_key(0, 0))


def test_a_new_salt_shares_nothing_with_the_last_replay(served) -> None:
    cfg = BenchConfig(base_url=served.url, trace=served.trace, num_prompts=None, warmup=False)
    wl = prepare(cfg)
    again = with_salt(cfg, wl, 1)
    assert [r.prompt_len for r in again.requests] == [r.prompt_len for r in wl.requests]
    both = [(None, r.prompt_ids, r.prompt_len) for r in wl.requests + again.requests]
    assert shared_prompt_tokens(both) == 2 * wl.shared_tokens
    assert with_salt(cfg, wl, 0) is wl
    salted = prepare(replace(cfg, prompt_salt=1))                   # --prompt-salt 1: the same prompts
    assert [r.prompt_ids for r in salted.requests] == [r.prompt_ids for r in again.requests]


def test_capacity_points_do_not_hit_each_other_and_cli_prints_sharing(served, tmp_path) -> None:
    res = CliRunner().invoke(cli, ["bench", "--base-url", served.url, "--trace", served.trace, "--num-prompts", "0",
                                   "--max-concurrency", "1", "--capacity", "--capacity-hi", "4",
                                   "--target", "0.5", "--save-result", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    shared = report["shared_prompt_tokens"]
    assert "Prefix sharing: the prompts share" in res.output and "Server prefix cache:" in res.output
    # every point (its own salt) found exactly the trace's sharing, none of the earlier points'
    assert len(report["runs"]) >= 2
    assert all(run["cached_prompt_tokens"] == shared for run in report["runs"])


def test_multi_turn_trace_replays_its_sessions_prefixes() -> None:
    """The bundled synthetic ``multi-turn`` trace (sessions whose turns extend the last
    prompt and answer) goes through the same hash-id prompts: each turn finds the last
    turn's prompt cached."""
    with ServerThread(_caching_app(), log_level="critical") as s:
        cfg = BenchConfig(base_url=s.url, trace="multi-turn", num_prompts=60, warmup=False, max_concurrency=1,
                          rate_scale=1000.0)
        wl = prepare(cfg)
        assert wl.shared_tokens > 0.5 * sum(r.prompt_len for r in wl.requests)
        out = run_once(cfg, wl, rate_scale=1000.0)
    assert out.summary["completed"] == 60
    assert out.summary["cached_prompt_tokens"] == wl.shared_tokens


def test_client_processes_report_every_request_cached_tokens(served) -> None:
    """With --workers 2 the cached counts of both client processes reach the summary."""
    cfg = BenchConfig(base_url=served.url, trace=served.trace, num_prompts=None, warmup=False, workers=2,
                      rate_scale=100.0)
    out = run_once(cfg, prepare(cfg), rate_scale=100.0)
    assert out.summary["completed"] == len(ROWS) and out.summary["cached_reported"] == len(ROWS)
    # the two processes' requests may reach the server in another order than the count assumes
    assert 0 < out.summary["cached_prompt_tokens"] < sum(n for n, _ in ROWS)
