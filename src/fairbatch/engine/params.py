"""Per-request sampling parameters and per-request results (no torch: the CLI and the
server can build them without loading the engine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fairbatch.kv import prompt_block_hashes


@dataclass
class SamplingParams:
    """vLLM's sampling parameters, with vLLM's names, defaults and meaning.

    ``temperature == 0`` is greedy; ``top_k <= 0`` and ``top_p == 1`` disable those
    filters; ``seed`` makes one request's samples reproducible whatever else is in its
    batches (and across preemptions). Logits are processed in vLLM V1's order
    (``engine/logits_ops.py``): ``allowed_token_ids``, ``min_tokens`` (EOS and
    ``stop_token_ids`` impossible until that many tokens exist), ``logit_bias``,
    ``repetition_penalty`` (prompt and output tokens), ``frequency_penalty`` and
    ``presence_penalty`` (output tokens, as OpenAI defines them); greedy rows take the
    argmax there, random rows go on through temperature, ``min_p``, top-k and top-p.
    ``logprobs`` / ``prompt_logprobs``: how many top alternatives to report per sampled /
    prompt token (0 = the chosen token only), from the raw logits as vLLM's default
    ``logprobs_mode`` does."""

    max_tokens: int = 16
    n: int = 1                     # samples per prompt (the offline LLM; the server has its own n)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # stop strings: the offline LLM watches them (engine/stop_strings.py); the server's
    # front end has its own (the request's ``stop``), so it leaves these empty
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    allowed_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Nothing beyond temperature / top-k / top-p / seed: the engine's per-step checks for
    # logits processing and logprobs pass such requests at one attribute read. Set at
    # construction: parameters are not changed once made (as vLLM's).
    plain: bool = field(init=False, repr=False, compare=False, default=True)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):      # vLLM takes one string too
            self.stop = [self.stop]
        self.stop = [x for x in self.stop if x]
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 and self.top_k != -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                             f"got {self.repetition_penalty}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
        self.plain = not (self.edits_logits or self.min_p or self.logprobs is not None
                          or self.prompt_logprobs is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def edits_logits(self) -> bool:
        """Anything applied to the logits before the greedy argmax (vLLM's
        non-argmax-invariant processing): then greedy rows need the processed logits too."""
        return bool(self.has_penalties or self.allowed_token_ids is not None or self.logit_bias
                    or self.min_tokens)

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError for a token id outside ``0..vocab_size-1`` in the token-id fields."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids),
                          ("logit_bias", list(self.logit_bias or ()))):
            bad = next((t for t in ids or () if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


MAX_LOGPROBS = 20                # vLLM's default max_logprobs
MAX_REPETITION_PENALTY = 1e6     # vLLM has no upper bound; a finite one keeps the logits finite


def prefix_cache_hashes(prompt_ids: Sequence[int], sp: SamplingParams, block_size: int,
                        enabled: bool) -> list[int] | None:
    """``Request.block_hashes`` for a prompt: the names of its full blocks, or None when the
    request must not read the prefix cache: caching is off, or it asks for prompt logprobs
    (scoring the prompt needs every position computed; vLLM skips the cache for them too)."""
    if not enabled or sp.prompt_logprobs is not None:
        return None
    return prompt_block_hashes(prompt_ids, block_size)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None           # "stop" | "length" | "abort"
    arrival: float = 0.0                # seconds on the driver's clock
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    # prompt tokens whose KV came from the prefix cache at its first admission (vLLM's
    # num_cached_tokens; 0 with caching off)
    num_cached_tokens: int = 0
    # with SamplingParams.logprobs / prompt_logprobs: per token, ``[(token id, logprob,
    # rank), ...]``, the token first, then the top k (prompt position 0: None)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    # vLLM's view: one CompletionOutput per sample (SamplingParams.n), ``outputs[0]`` the
    # sample the fields above describe (engine/outputs.py)
    outputs: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """vLLM's definition: (e2e - ttft) / (output_len - 1)."""
        n = len(self.token_ids)
        if n < 2 or self.finish_time is None or self.first_token_time is None:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)
