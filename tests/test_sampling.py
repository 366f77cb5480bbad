"""vLLM's sampling parameters on the engine side (CPU): each logits operation against
vLLM's formula written out by hand, the batched sampler on mixed batches, and the
offline ``LLM`` end to end (min_tokens, stop tokens, logprobs, prompt logprobs)."""

from __future__ import annotations

import math

import pytest
import torch

from fairbatch.engine import logits_ops as ops
from fairbatch.engine.params import SamplingParams
from fairbatch.engine.sampler import Sampler, process
from fairbatch.request import SLO, Request


def req(prompt, output=(), **sp) -> Request:
    r = Request("r", 0.0, len(prompt), 64, SLO(1, 1), prompt_token_ids=list(prompt),
                sampling=SamplingParams(max_tokens=64, **sp))
    r.output_token_ids = list(output)
    r.generated = len(output)
    return r


# --- logits operations, one by one -------------------------------------------------------------
def test_penalties_follow_vllms_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt, output = [0, 1], [3, 3, 2]
    out = ops.apply_penalties(logits, [prompt], [output], [1.5], [0.25], [0.75])
    want = logits.clone()[0].tolist()
    for t in range(5):
        if t in prompt or t in output:       # repetition: prompt and output
            want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
        want[t] -= 0.25 * output.count(t)    # frequency: output counts
        want[t] -= 0.75 * (t in output)      # presence: output only
    assert out[0].tolist() == pytest.approx(want)
    assert logits[0, 0] == 2.0               # the caller's tensor is untouched


def test_penalties_off_rows_unchanged_in_a_mixed_batch():
    logits = torch.randn(3, 8)
    out = ops.apply_penalties(logits, [[1], [1, 2], [3]], [[4], [5, 5], [6]], [1.0, 2.0, 1.0],
                              [0.0, 0.0, 1.0], [0.0, 0.0, 0.0])
    assert torch.equal(out[0], logits[0])
    assert out[2, 6] == pytest.approx(logits[2, 6] - 1.0)
    assert out[1, 3] == logits[1, 3]         # not seen: untouched


def test_allowed_ids_bias_block_and_min_p():
    logits = torch.zeros(2, 6)
    a = ops.allowed_only(logits, [[1, 4], None])
    assert torch.isinf(a[0]).tolist() == [True, False, True, True, False, True]
    assert torch.equal(a[1], logits[1])
    b = ops.add_bias(logits, [{2: 5.0}, {0: -3.0, 5: 1.0}])
    assert b[0, 2] == 5 and b[1, 0] == -3 and b[1, 5] == 1 and b.sum() == 3
    blk = ops.block_tokens(logits, [[3], []])
    assert math.isinf(blk[0, 3]) and not torch.isinf(blk[1]).any()
    # min_p 0.5: keeps tokens with p >= 0.5 * max p
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    mp = ops.apply_min_p(lg, [0.5])
    assert torch.isinf(mp[0]).tolist() == [False, False, True, True]


def test_logprob_entries_rank_and_top_k():
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), dim=-1)
    [row] = ops.logprob_entries(lp, [2], [2])
    assert row[0][0] == 2 and row[0][2] == 3                 # chosen first, rank 3
    assert row[0][1] == pytest.approx(lp[0, 2].item())
    assert [(t, r) for t, _, r in row[1:]] == [(1, 1), (3, 2)]


# --- the sampler -------------------------------------------------------------------------------
def test_greedy_rows_see_penalties_and_bias():
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    reqs = [req([0], temperature=0), req([0], temperature=0, repetition_penalty=2.0),
            req([1], temperature=0, logit_bias={2: 10.0})]
    assert s.sample(logits, reqs) == [0, 1, 2]


def test_min_tokens_holds_back_stop_tokens_until_reached():
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])      # token 1 is EOS, 2 a stop token
    stops = [{1, 2}]
    young = req([0], output=[3], temperature=0, min_tokens=2)
    assert s.sample(logits, [young], stops) == [3]
    grown = req([0], output=[3, 3], temperature=0, min_tokens=2)
    assert s.sample(logits, [grown], stops) == [1]


def test_allowed_token_ids_and_min_p_bound_random_sampling():
    s = Sampler(torch.device("cpu"), seed=1)
    logits = torch.randn(1, 50)
    allowed = [3, 7, 11]
    picks = {s.sample(logits, [req([0], temperature=1.0, allowed_token_ids=allowed)])[0] for _ in range(50)}
    assert picks <= set(allowed)
    peaked = torch.full((1, 50), -5.0)
    peaked[0, 9] = 5.0
    peaked[0, 4] = 4.0
    picks = {s.sample(peaked, [req([0], temperature=1.0, min_p=0.2)])[0] for _ in range(50)}
    assert picks <= {4, 9}                              # p(4)/p(9) = e^-1 > 0.2; the rest far below


def test_invalid_params_raise():
    for bad in (dict(repetition_penalty=0), dict(repetition_penalty=-5), dict(min_p=1.5),
                dict(presence_penalty=3), dict(min_tokens=20), dict(allowed_token_ids=[]),
                dict(logprobs=21), dict(prompt_logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(max_tokens=16, **bad)


# --- the offline LLM, end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    from fairbatch import LLM

    return LLM("tiny-llama", load_format="dummy", num_kv_blocks=64, max_model_len=256)


def test_min_tokens_then_forced_eos(llm):
    eos = llm.engine.eos_token_ids[0]
    sp = SamplingParams(max_tokens=10, temperature=0, min_tokens=4, logit_bias={eos: 100.0})
    [out] = llm.generate([[5, 6, 7]], sp)
    # EOS is the argmax from the start, impossible for the first 4 tokens, then taken
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    assert out.finish_reason == "stop"


def test_stop_token_ids_and_allowed_ids(llm):
    sp = SamplingParams(max_tokens=12, temperature=0, allowed_token_ids=[40, 41], stop_token_ids=[41])
    [out] = llm.generate({"prompt_token_ids": [9, 8, 7]}, sp)
    assert set(out.token_ids) <= {40, 41}
    assert out.finish_reason == ("stop" if 41 in out.token_ids else "length")


def test_logprobs_and_prompt_logprobs_match_a_full_forward(llm):
    prompt = [11, 12, 13, 14, 15]
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1)
    [out] = llm.generate([prompt], sp)
    assert len(out.logprobs) == 3
    for tok, entries in zip(out.token_ids, out.logprobs):
        assert entries[0][0] == tok and entries[0][2] == 1    # greedy: rank 1
        assert len(entries) == 3 and entries[1][0] == tok      # top-1 is the chosen token
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    # greedy continuation of the prompt's scores: the score of the first output token
    # given the whole prompt equals what the prompt's last row predicts
    [ref] = llm.generate([prompt + out.token_ids[:1]], SamplingParams(max_tokens=1, temperature=0,
                                                                       prompt_logprobs=0))
    assert ref.prompt_logprobs[-1][0][1] == pytest.approx(out.logprobs[0][0][1], abs=1e-4)
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][0][0] == prompt[pos]
        assert ref.prompt_logprobs[pos][0][1] == pytest.approx(out.prompt_logprobs[pos][0][1], abs=1e-4)


def test_generate_takes_vllm_prompt_shapes(llm):
    sp = SamplingParams(max_tokens=2, temperature=0)
    a = llm.generate({"prompt": "hi"}, sp)
    b = llm.generate(["hi"], sp)
    c = llm.generate([{"prompt_token_ids": llm.tokenizer.encode("hi")}], sp)
    d = llm.generate(llm.tokenizer.encode("hi"), sp)
    assert a[0].token_ids == b[0].token_ids == c[0].token_ids == d[0].token_ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "x", "multi_modal_data": {}}, sp)


def test_prompt_logprobs_across_prefill_chunks(llm):
    """A prompt prefilled in chunks of 4 tokens is scored exactly as in one pass."""
    from fairbatch import LLM

    chunked = LLM("tiny-llama", load_format="dummy", num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=4)
    prompt = list(range(20, 31))
    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, logprobs=0)
    [a] = chunked.generate([prompt], sp)
    [b] = llm.generate([prompt], sp)
    assert len(a.prompt_logprobs) == len(prompt) and a.prompt_logprobs[0] is None
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert [t for t, _, _ in x] == [t for t, _, _ in y]
        assert [lp for _, lp, _ in x] == pytest.approx([lp for _, lp, _ in y], abs=1e-4)
    assert a.token_ids == b.token_ids


def test_vllm_style_outputs_and_n(llm):
    """``out.outputs[i]`` as vLLM's LLM.generate returns them: n samples per prompt (a
    seeded request's j-th sample seeded seed + j), logprobs as {id: Logprob}."""
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, logprobs=1, ignore_eos=True)
    [out] = llm.generate("hello", sp)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.token_ids and out.outputs[0].text == out.text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1          # different seeds, different samples
    [again] = llm.generate("hello", sp)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    c = out.outputs[1]
    assert len(c.logprobs) == 6 and all(next(iter(d)) == t for d, t in zip(c.logprobs, c.token_ids))
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)))
    assert c.finish_reason == "length" and c.stop_reason is None and out.finished
    stopped = llm.generate([[5, 6]], SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=[40, 41],
                                                    logit_bias={41: 50.0}, stop_token_ids=[41]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == 41


def test_stop_strings_end_offline_requests_early(llm):
    letters = list(range(97, 123))
    base = dict(max_tokens=16, temperature=0, ignore_eos=True, allowed_token_ids=letters)
    [full] = llm.generate([[1, 2, 3]], SamplingParams(**base))
    stop = full.text[4:6]
    cut = full.text.find(stop)
    [out] = llm.generate([[1, 2, 3]], SamplingParams(**base, stop=[stop]))
    c = out.outputs[0]
    assert c.text == out.text == full.text[:cut] and c.finish_reason == "stop" and c.stop_reason == stop
    assert len(c.token_ids) < 16 and c.token_ids == full.token_ids[:len(c.token_ids)]    # ended early
    [kept] = llm.generate([[1, 2, 3]], SamplingParams(**base, stop=stop, include_stop_str_in_output=True))
    assert kept.text == full.text[:cut + len(stop)]
    a = llm.engine.allocator
    assert a.num_free == a.num_blocks and not llm.scheduler.has_work()    # the aborted request freed its KV


def test_a_seeded_row_draws_the_same_token_whether_or_not_the_step_sorts():
    """Without top-k/top-p a step samples without sorting the vocabulary; a batch-mate with
    top-k makes it sort. A seeded request's token must not depend on which happened."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    for generated in range(20):
        plain = req([0], output=[0] * generated, temperature=1.0, seed=11)
        alone = Sampler(torch.device("cpu"), seed=0).sample(logits[:1], [plain])
        beside_top_k = Sampler(torch.device("cpu"), seed=5).sample(logits, [plain, req([0], temperature=1.0, top_k=5)])
        assert beside_top_k[0] == alone[0]


def test_sampling_without_a_sort_draws_from_the_softmax():
    """The unsorted race samples each token with its softmax probability (4,000 seeded draws
    of a 4-token distribution, each frequency within 0.025 of its probability)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None, :].repeat(4000, 1)
    s = Sampler(torch.device("cpu"), seed=2)
    picks = torch.tensor(s.sample(logits, [req([0], temperature=1.0) for _ in range(4000)]))
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.025), freq


# --- on a GPU: the host lists go to the device through pinned memory, without waiting --------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_logits_processing_on_a_gpu_matches_the_cpu():
    """Every logits operation and the greedy/top-k/top-p sampler's choices on CUDA equal the
    CPU's for the same logits: their small host lists (allow-lists, min_tokens blocks,
    biases, penalties' token counts, min-p, temperatures, k, p) reach the device by
    non-blocking copies from pinned memory (``logits_ops.to_device``)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=g) * 3
    stops = [{7}, {8}, set(), set(), {9}, set()]
    reqs = [req([1, 2], output=[3, 3, 4], temperature=0, frequency_penalty=0.5, presence_penalty=0.25),
            req([5], output=[6], temperature=0, repetition_penalty=1.7, min_tokens=4),
            req([9], temperature=0, logit_bias={11: 5.0, 12: -3.0}),
            req([9], temperature=0, allowed_token_ids=[13, 14, 15, 200]),
            req([1], output=[2], temperature=0, min_p=0.3, min_tokens=3),
            req([4], temperature=0)]
    params = [r.sampling for r in reqs]
    cpu = ops.apply_min_p(process(
        logits, reqs, params, stops), [p.min_p for p in params])
    dev = torch.device("cuda")
    gpu = ops.apply_min_p(process(
        logits.to(dev), reqs, params, stops), [p.min_p for p in params])
    assert torch.allclose(cpu, gpu.cpu(), equal_nan=True)
    assert Sampler(torch.device("cpu")).sample(logits, reqs, stops) == Sampler(dev).sample(logits.to(dev), reqs, stops)
    trunc = [req([1], temperature=0.7, top_k=3, seed=i) for i in range(3)] + [req([1], temperature=0.5, top_p=0.01)]
    got = Sampler(dev).sample(logits[:4].to(dev), trunc)
    assert all(t in logits[i].topk(3).indices.tolist() for i, t in enumerate(got[:3]))
    assert got[3] == int(logits[3].argmax())
