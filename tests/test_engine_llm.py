"""The engine driven by the real schedulers: every policy runs to completion with no KV
block leaked (through preemptions), greedy outputs equal transformers'; sampling, stop
conditions, errors, tokenizers and the `generate` / `profile` commands."""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_engine_support import hf_greedy, hf_model, write_checkpoint
from typer.testing import CliRunner

from fairbatch.engine.llm import LLM
from fairbatch.engine.params import SamplingParams
from fairbatch.scheduler.base import SchedulerConfig, policy_names

N_PROMPTS, MAX_TOKENS = 10, 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_checkpoint("tiny-llama", tmp_path_factory.mktemp("llm"), seed=11)
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(3, 70))] for _ in range(N_PROMPTS)]
    hf = hf_model(path)
    return path, prompts, [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("policy", policy_names())
def test_policy_runs_engine_to_completion_without_leaks(ckpt, policy):
    path, prompts, want = ckpt
    # 20 blocks of 16 = 320 token slots for ~10 x 60 tokens: preemption and recompute happen
    cfg = SchedulerConfig(max_num_batched_tokens=96, max_num_seqs=8, chunk_size=64)
    llm = LLM(str(path), policy=policy, scheduler_config=cfg, dtype="float32", num_kv_blocks=20)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    a = llm.engine.allocator
    assert a.num_free == a.num_blocks
    a.check_invariants()
    assert not llm.scheduler.has_work()
    assert llm.scheduler.stats.preemptions > 0 or policy not in ("vllm", "sarathi")
    for p, o, w in zip(prompts, outs, want):
        assert o.finish_reason == "length"
        assert o.token_ids == w, f"{policy}: prompt of {len(p)} tokens diverged (preemptions {o.num_preemptions})"


def test_sampling_parameters(ckpt):
    path, prompts, want = ckpt
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128)
    p = prompts[:4]
    # top-k 1 and a tiny top-p are greedy whatever the temperature
    for sp in (SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=1, ignore_eos=True),
               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=1e-6, ignore_eos=True)):
        assert [o.token_ids for o in llm.generate(p, sp)] == want[:4]
    # a seeded request samples the same tokens alone or in any batch
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = llm.generate([p[0]], sp)[0].token_ids
    batched = llm.generate(p, [sp] + [SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)] * 3)
    assert batched[0].token_ids == alone
    # unseeded temperature sampling is not greedy
    hot = llm.generate([p[1]] * 4, SamplingParams(max_tokens=12, temperature=1.5, ignore_eos=True))
    assert any(o.token_ids != want[1][:12] for o in hot)
    assert all(0 <= t < 512 for o in hot for t in o.token_ids)


def test_stop_tokens(ckpt):
    path, prompts, want = ckpt
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128)
    stop = want[0][5]
    first = want[0].index(stop)
    o = llm.generate([prompts[0]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[stop]))[0]
    assert o.finish_reason == "stop" and o.token_ids == want[0][:first + 1]
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_eos_stops_unless_ignored():
    llm = LLM("tiny-llama", load_format="dummy", dtype="float32", num_kv_blocks=64)
    assert llm.engine.eos_token_ids == (257,)          # the byte tokenizer's, for dummy models
    first = llm.generate("hi", SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids[0]
    llm.engine.executor.eos_token_ids = frozenset({first})   # make the greedy token an EOS
    o = llm.generate("hi", SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert o.token_ids == [first] and o.finish_reason == "stop"
    o = llm.generate("hi", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(o.token_ids) == 8 and o.finish_reason == "length"


def test_prompt_errors_and_text_io():
    llm = LLM("tiny-qwen3", load_format="dummy", max_model_len=64, num_kv_blocks=32)
    with pytest.raises(ValueError, match="prompt of 70 tokens exceeds the context limit of 64 tokens"):
        llm.generate(["x" * 70])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 9999]])
    outs = llm.generate(["héllo", "world"], SamplingParams(max_tokens=5, temperature=0.0))
    assert all(isinstance(o.text, str) and len(o.token_ids) == 5 for o in outs)
    assert outs[0].prompt_token_ids == list("héllo".encode())
    assert outs[0].ttft is not None and outs[0].ttft >= 0 and outs[0].tpot is not None


def test_hf_tokenizer_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = write_checkpoint("tiny-llama", tmp_path / "tok")
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "foo", "bar"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    llm = LLM(str(path), num_kv_blocks=32)
    assert llm.tokenizer.encode("hello world foo") == [1, 2, 3]
    out = llm.generate("hello world", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == [1, 2] and isinstance(out.text, str)


# --- CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    from fairbatch.cli import app

    return app


def test_generate_command_prompts_file(cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "abc", "max_tokens": 3}\n')
    out = tmp_path / "out.jsonl"
    summary = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompts", str(prompts),
                                 "--max-tokens", "5", "--policy", "fairbatching", "--num-kv-blocks", "64",
                                 "--output", str(out), "--json", str(summary)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(x["token_ids"]) for x in rows] == [5, 3]
    assert json.loads(summary.read_text())["completed"] == 2


def test_generate_command_trace(cli, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "-m", "tiny-qwen3", "--load-format", "dummy", "--trace", "azure-code",
                                 "--num-requests", "4", "--offline", "--max-model-len", "512", "--policy", "sarathi",
                                 "--num-kv-blocks", "96", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "Successful requests:" in r.output and "clipped" in r.output


@pytest.mark.parametrize("args,needle", [
    (["generate", "-m", "tiny-llama", "--prompt", "x"], "preset without weights"),
    (["generate", "-m", "tiny-llama", "--load-format", "dummy"], "exactly one of"),
    (["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompt", "x", "--policy", "nope"], "unknown policy"),
    (["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompt", "x" * 100, "--max-model-len", "50"],
     "exceeds the context limit"),
    (["profile", "-m", "/no/such/dir"], "not found"),
    (["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompt", "x", "--prefill-attention", "sdpa"],
     "need the triton backend"),
    (["generate", "-m", "tiny-llama", "--load-format", "dummy", "--prompt", "x", "--attention-overlap"],
     "need the triton backend"),
    (["profile", "-m", "tiny-llama", "--load-format", "dummy", "--prefill-attention", "flash"],
     "unknown prefill attention 'flash'; choose from triton, sdpa"),
])
def test_command_errors_are_one_line(cli, args, needle):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output


def test_profile_command_writes_a_loadable_profile(cli, tmp_path):
    from fairbatch.latency.profiles import load_profile

    out = tmp_path / "prof.json"
    r = CliRunner().invoke(cli, ["profile", "-m", "tiny-llama", "--load-format", "dummy", "--quick", "--repeats", "1",
                                 "--max-num-batched-tokens", "600", "--num-kv-blocks", "200", "--dtype", "float32",
                                 "--out", str(out), "--samples", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    model = load_profile(out)
    assert model.meta["num_test"] >= 1 and "holdout_p95_rel_err" in model.meta
    assert len(json.loads((tmp_path / "s.json").read_text())) >= 10
