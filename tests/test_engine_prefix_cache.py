"""Automatic prefix caching in the engine and the server (docs/PREFIX_CACHING.md, "Engine
and server"): a request whose leading prompt blocks are cached starts its first step at
``num_computed > 0``, like a chunked-prefill continuation. Checked on tiny random
checkpoints against transformers: greedy outputs equal with and without the cache, the
first step's logits after a cached prefix, cached blocks' KV never written, preemption
and abort with shared blocks, prompt logprobs (which skip the cache); the server's
``usage.prompt_tokens_details.cached_tokens`` and vLLM's prefix-cache counters; the same
on CUDA (``-m gpu``)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_engine_support import hf_greedy, hf_logits, hf_model, write_checkpoint

from fairbatch.engine.llm import LLM
from fairbatch.engine.params import SamplingParams
from fairbatch.request import Request
from fairbatch.scheduler.base import SchedulerConfig, policy_names

B = 16                # the engine's block size
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


BASE = _ids(64, 1)                        # four full blocks every prompt below starts with
WARM = BASE + _ids(9, 2)                  # run first: it puts the four blocks in the cache
PROMPTS = [
    BASE + _ids(7, 3),                    # 71 tokens: all four blocks cached -> 64
    BASE + _ids(20, 4),                   # 84 tokens: 64
    BASE,                                 # 64 tokens, block-aligned: the last block is recomputed -> 48
    BASE[:40] + _ids(30, 5),              # diverges inside the third block -> 32
    _ids(50, 6),                          # shares nothing -> 0
    BASE + _ids(1, 9),                    # 65 tokens: its first step is one token, like a decode -> 64
]
CACHED = [64, 64, 48, 32, 0, 64]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_checkpoint("tiny-llama", tmp_path_factory.mktemp("prefix"), seed=5)
    hf = hf_model(path)
    return path, hf, {tuple(p): hf_greedy(hf, p, MAX_TOKENS) for p in [WARM, *PROMPTS]}


def _llm(path, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    return LLM(str(path), dtype="float32", **kw)


def _drained(llm: LLM) -> None:
    a = llm.engine.allocator
    a.check_invariants()
    assert not llm.scheduler.has_work()
    assert a.num_free == a.num_blocks          # cached blocks nobody holds count as free


def test_greedy_equal_with_and_without_cache_and_to_transformers(ckpt):
    path, _, want = ckpt
    on, off = _llm(path), _llm(path, enable_prefix_caching=False)
    assert on.engine.allocator.prefix_caching and not off.engine.allocator.prefix_caching
    outs = {}
    for name, llm in (("on", on), ("off", off)):
        first = llm.generate([WARM], GREEDY)[0]
        assert first.token_ids == want[tuple(WARM)]
        outs[name] = llm.generate(PROMPTS, GREEDY)
        _drained(llm)
    for p, o_on, o_off in zip(PROMPTS, outs["on"], outs["off"]):
        assert o_on.token_ids == o_off.token_ids == want[tuple(p)]
    assert [o.num_cached_tokens for o in outs["on"]] == CACHED
    assert [o.num_cached_tokens for o in outs["off"]] == [0] * len(PROMPTS)
    a = on.engine.allocator
    assert a.prefix_hits == sum(CACHED)
    assert off.engine.allocator.prefix_hits == 0


def test_sampling_that_reads_the_prompt_is_unchanged_by_the_cache(ckpt):
    """Penalties read every prompt token and seeded sampling draws by token index: a
    request that starts after a cached prefix samples what it would without it."""
    path, _, _ = ckpt
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, presence_penalty=1.0,
                             frequency_penalty=0.5, ignore_eos=True)]
    got = []
    for caching in (True, False):
        llm = _llm(path, enable_prefix_caching=caching)
        llm.generate([WARM], GREEDY)
        outs = llm.generate([PROMPTS[0]] * len(params), params)
        got.append([o.token_ids for o in outs])
        if caching:
            assert all(o.num_cached_tokens == 64 for o in outs)
    assert got[0] == got[1]


def _drive(llm: LLM, reqs: list[Request], *, abort_at: dict[int, str] | None = None
           ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Step the instance until every request ended; returns each request's block table and
    ``num_computed`` at its first step. ``abort_at``: step number -> request to abort
    before that step. Checks the allocator's invariants after every step."""
    inst, a = llm.instance, llm.engine.allocator
    for r in reqs:
        inst.add(r, 0.0)
    tables: dict[str, list[int]] = {}
    first: dict[str, int] = {}
    t, step = 0.0, 0
    while inst.has_work():
        t += 1e-3
        step += 1
        if abort_at and step in abort_at:
            inst.abort(abort_at[step], t)
            a.check_invariants()
        plan, result = inst.begin_step(t)
        for req, _ in plan.chunks:
            if req.request_id not in first:
                first[req.request_id] = req.num_computed
                tables[req.request_id] = list(a.block_table(req.request_id))
        inst.end_step(plan, result, t)
        a.check_invariants()
    return tables, first


def test_cached_blocks_are_reused_and_never_written(ckpt):
    path, _, want = ckpt
    llm = _llm(path, policy="vllm")
    kv = llm.engine.kv
    a = llm.make_request(WARM, GREEDY, request_id="a")
    tables_a, _ = _drive(llm, [a])
    before = kv.data.clone()
    b = llm.make_request(PROMPTS[1], GREEDY, request_id="b")
    tables_b, first = _drive(llm, [b])
    assert first["b"] == 64
    reused = tables_b["b"][:4]
    assert reused == tables_a["a"][:4]            # the very blocks request a computed
    assert torch.equal(kv.data[:, :, reused], before[:, :, reused])    # bit for bit: never written
    assert b.output_token_ids == want[tuple(PROMPTS[1])]
    _drained(llm)


def test_first_step_after_a_cached_prefix_matches_transformers(ckpt):
    """The logits of a step that starts at num_computed > 0 (positions, slot mapping,
    block table, attention over the cached blocks) equal the reference forward's."""
    path, hf, _ = ckpt
    llm = _llm(path, policy="vllm")
    _drive(llm, [llm.make_request(WARM, GREEDY, request_id="warm")])
    sched, inst = llm.scheduler, llm.instance
    reqs = [llm.make_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
    for r in reqs:
        inst.add(r, 0.0)
    plan = sched.schedule(1.0)
    assert len(plan.chunks) == len(PROMPTS)
    logits = llm.engine.executor.logits_of_all_tokens(plan)
    row = 0
    for req, k in plan.chunks:
        c = req.num_computed
        assert c == CACHED[int(req.request_id[1:])]
        ref = hf_logits(hf, req.prompt_token_ids)[c:c + k]
        got = logits[row:row + k]
        assert ((got - ref).norm() / ref.norm()).item() < 2e-4, req.request_id
        row += k
    for r in reqs:                 # abort right after admission, holding shared blocks
        inst.abort(r.request_id, 1.0)
        llm.engine.allocator.check_invariants()
    _drained(llm)


@pytest.mark.parametrize("policy", policy_names())
def test_preemption_with_shared_blocks(ckpt, policy):
    """A KV cache too small for the batch: requests sharing cached blocks are preempted and
    recomputed (re-attaching the cache); outputs stay transformers' and no block leaks."""
    path, _, want = ckpt
    cfg = SchedulerConfig(max_num_batched_tokens=96, max_num_seqs=8, chunk_size=64)
    llm = _llm(path, policy=policy, scheduler_config=cfg, num_kv_blocks=16)
    assert llm.generate([WARM], GREEDY)[0].token_ids == want[tuple(WARM)]
    # about 20 blocks' worth, 4 of them shared; the newest (whom FCFS policies preempt) share
    prompts = [PROMPTS[4], *PROMPTS[:4], WARM]
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == want[tuple(p)], f"{policy}: diverged after {o.num_preemptions} preemptions"
    _drained(llm)
    assert [o.num_cached_tokens for o in outs] == [0, *CACHED[:4], 64]
    assert llm.scheduler.stats.preemptions > 0 or policy not in ("vllm", "sarathi")
    if llm.scheduler.stats.preemptions:        # a request holding shared blocks was among them
        assert any(o.num_preemptions and o.num_cached_tokens for o in outs)


def test_abort_of_a_request_sharing_blocks(ckpt):
    path, _, want = ckpt
    llm = _llm(path, policy="vllm")
    _drive(llm, [llm.make_request(WARM, GREEDY, request_id="warm")])
    reqs = [llm.make_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS[:3])]
    _, first = _drive(llm, reqs, abort_at={3: "r1"})
    assert first == {"r0": 64, "r1": 64, "r2": 48}
    assert reqs[1].finish_reason == "abort"
    for i in (0, 2):
        assert reqs[i].output_token_ids == want[tuple(PROMPTS[i])]
    _drained(llm)
    # the shared blocks are still cached after the abort
    again = llm.generate([PROMPTS[0]], GREEDY)[0]
    assert again.num_cached_tokens == 64 and again.token_ids == want[tuple(PROMPTS[0])]


def test_prompt_logprobs_requests_skip_the_cache(ckpt):
    path, _, want = ckpt
    sp = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, ignore_eos=True)
    results = []
    for caching in (True, False):
        llm = _llm(path, enable_prefix_caching=caching)
        llm.generate([WARM, PROMPTS[0]], GREEDY)               # the prompt's blocks are cached
        out = llm.generate([PROMPTS[0]], sp)[0]
        assert out.num_cached_tokens == 0
        assert out.token_ids == want[tuple(PROMPTS[0])][:4]
        results.append(out.prompt_logprobs)
        _drained(llm)
    on, off = results
    assert on[0] is None and len(on) == len(PROMPTS[0])
    for a, b in zip(on[1:], off[1:]):
        assert [t for t, _, _ in a] == [t for t, _, _ in b]
        assert [lp for _, lp, _ in a] == pytest.approx([lp for _, lp, _ in b], abs=1e-5)


def test_generate_command_prefix_caching_flags(tmp_path):
    from typer.testing import CliRunner

    from fairbatch.cli import app

    runner = CliRunner()
    base = ["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompt", "hello", "--max-tokens", "2",
            "--num-kv-blocks", "32"]
    for flags, state in (([], "on"), (["--no-prefix-caching"], "off"), (["--no-enable-prefix-caching"], "off"),
                         (["--enable-prefix-caching"], "on")):
        r = runner.invoke(app, base + flags)
        assert r.exit_code == 0, r.output
        assert f"prefix caching {state}" in r.output


@pytest.mark.parametrize("flag", ["--enable-prefix-caching", "--no-enable-prefix-caching", "--no-prefix-caching"])
def test_serve_takes_the_prefix_caching_flags(flag):
    """The flags parse (a bad later option then fails as usual, before any model loads)."""
    from typer.testing import CliRunner

    from fairbatch.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", "tiny-llama", "--load-format", "dummy", flag,
                                 "--metrics-prefix", "bad:"])
    assert r.exit_code == 2 and "metrics prefix" in r.output, r.output


# --- the server ------------------------------------------------------------------------------
def _server(**kw):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fairbatch.server import ServerThread, build_app, load_served_model

    model = load_served_model("tiny-llama", load_format="dummy", cpu_threads=1, num_kv_blocks=200, **kw)
    app = build_app(model, metrics_prefix="vllm")
    return ServerThread(app), httpx


@pytest.fixture(scope="module")
def served():
    server, httpx = _server()
    with server as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c


def _completion(http, prompt, **body) -> dict:
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_reports_cached_tokens_and_vllm_counters():
    from support import metric, wait_for

    server, httpx = _server()
    with server as s, httpx.Client(base_url=s.url, timeout=60) as http:
        _cached_tokens_and_counters(http, metric, wait_for)


def _cached_tokens_and_counters(http, metric, wait_for) -> None:
    def counters() -> tuple[float, float]:
        text = http.get("/metrics").text
        return metric(text, "vllm:prefix_cache_queries_total"), metric(text, "vllm:prefix_cache_hits_total")

    prompt = _ids(80, 7)
    first = _completion(http, prompt)["usage"]
    assert first["prompt_tokens"] == 80 and first["prompt_tokens_details"] == {"cached_tokens": 0}
    second = _completion(http, prompt)["usage"]
    assert second["prompt_tokens_details"] == {"cached_tokens": 64}      # (80 - 1) // 16 blocks
    # n samples of a prompt: its cached tokens are counted once, as its prompt tokens are
    both = _completion(http, prompt, n=2)["usage"]
    assert both["prompt_tokens"] == 80 and both["prompt_tokens_details"] == {"cached_tokens": 64}
    # the engine's snapshot catches up after the answers
    wait_for(lambda: counters() == (4 * 80, 3 * 64), "the prefix-cache counters")
    text = http.get("/metrics").text
    assert metric(text, "vllm:cache_config_info", enable_prefix_caching="True") == 1
    info = http.get("/v1/models").json()["data"][0]["fairbatch"]
    assert info["prefix_caching"] is True and info["block_size"] == B


def test_server_cached_tokens_in_chat_and_streams(served):
    http = served
    messages = [{"role": "system", "content": "You are a terse assistant. " * 4},
                {"role": "user", "content": "hello"}]
    body = {"messages": messages, "max_tokens": 2, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    n = r.json()["usage"]["prompt_tokens"]
    r = http.post("/v1/chat/completions", json=body)
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // B * B}
    import json

    usages = []
    with http.stream("POST", "/v1/chat/completions",
                     json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    usages.append(ev["usage"])
    assert usages[-1]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // B * B}


def test_server_without_prefix_caching():
    from support import metric, wait_for

    server, httpx = _server(enable_prefix_caching=False)
    with server as s, httpx.Client(base_url=s.url, timeout=60) as http:
        prompt = _ids(80, 8)
        for _ in range(2):
            usage = _completion(http, prompt)["usage"]
            assert "prompt_tokens_details" not in usage
        wait_for(lambda: metric(http.get("/metrics").text, "vllm:engine_steps_total") > 0, "a snapshot")
        text = http.get("/metrics").text
        assert metric(text, "vllm:prefix_cache_queries_total") == metric(text, "vllm:prefix_cache_hits_total") == 0
        assert "vllm:prefix_cache_hits_total{" in text
        assert metric(text, "vllm:cache_config_info", enable_prefix_caching="False") == 1
        assert http.get("/v1/models").json()["data"][0]["fairbatch"]["prefix_caching"] is False


# --- CUDA ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_cache_on_gpu(ckpt, backend):
    """On CUDA (triton: decode and mixed CUDA graphs replay steps that start after a cached
    prefix): outputs equal transformers' with and without the cache, under preemption."""
    path, _, want = ckpt
    prompts = PROMPTS + [WARM]
    for blocks in (64, 16):            # 16: preemption and recompute
        outs = {}
        for caching in (True, False):
            llm = LLM(str(path), dtype="float32", device="cuda", attention_backend=backend, num_kv_blocks=blocks,
                      max_num_seqs=8, enable_prefix_caching=caching,
                      scheduler_config=SchedulerConfig(max_num_batched_tokens=96, max_num_seqs=8))
            llm.generate([WARM], GREEDY)
            outs[caching] = llm.generate(prompts, GREEDY)
            _drained(llm)
            if caching and blocks == 64:
                assert [o.num_cached_tokens for o in outs[caching][:len(PROMPTS)]] == CACHED
            if backend == "triton":
                g = llm.engine.executor.graphs
                assert g is not None and g.replays > 0 and g.mixed_replays > 0
                if caching:     # alone, its first step (one token after 64 cached) replays a decode graph
                    before = g.replays
                    out = llm.generate([PROMPTS[5]], GREEDY)[0]
                    assert out.num_cached_tokens == 64 and out.token_ids == want[tuple(PROMPTS[5])]
                    assert g.replays - before == MAX_TOKENS
        for p, a, b in zip(prompts, outs[True], outs[False]):
            assert a.token_ids == b.token_ids == want[tuple(p)], (blocks, len(p))
