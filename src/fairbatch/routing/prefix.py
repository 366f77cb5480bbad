"""``prefix``: send a request where its prompt's prefix is probably cached, unless that
instance is overloaded.

A router cannot see the instances' prefix caches. It knows what it sent where, so it
keeps, per instance, an approximate index of the block names (``block_hashes``: one per
full KV block, hash-chained, so a name stands for its whole prefix) of the prompts it
sent there (``PrefixIndex``): bounded, least recently sent evicted first, as an
instance's cache evicts its least recently used free blocks. The index holds the names
of every prompt routed there, also those the instance has since evicted, and none of the
outputs; it is an estimate.

**The rule.** For each candidate instance ``i``: ``cached_i``, the prompt tokens of the
longest prefix its index holds; its request count (running + waiting + sent since its
load) and its admission budget (less the tokens sent since). An instance whose count is
more than ``balance_abs`` over the least loaded candidate's and more than
``balance_rel`` times it gets no credit for what it holds (``cached_i`` counts as 0):
affinity never piles requests onto an instance far ahead of the others. With
``need_i = prompt_len - cached_i``, the tokens it would prefill, the pick is, in order:

1. an instance whose budget covers ``need_i``, if any does;
2. the most ``cached_i``;
3. the most budget left after the prompt, ``budget_i - need_i``;
4. the fewest requests.

With nothing cached anywhere this is the ``admission`` rule. A hot prefix stays on one
instance until it runs ahead of the least loaded or out of budget; the next request then
goes elsewhere, that instance now holds the prefix too, and later requests split between
the holders by their budgets.

Sends are counted with their uncached tokens in ``sent_tokens`` (the work the instance
was given). A decision costs O(instances x log(prompt blocks)) index lookups and one
O(prompt blocks) index update: 70 us with 4 instances and 110 us with 16 for a
512-block (8k-token) prompt on the 2-core dev machine, against 5-12 us for ``admission``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from fairbatch.routing.base import Router
from fairbatch.scheduler.base import Load

_INF = float("inf")
DEFAULT_INDEX_BLOCKS = 1 << 15    # per instance, when neither the option nor its load says


class PrefixIndex:
    """The block names last sent to one instance, at most ``capacity``, least recently sent
    evicted first.

    ``insert`` touches a prompt's names last block first, so every prefix of a prompt is
    at least as recent as the prompt: eviction takes the tails of chains first and the
    names an index holds of any chain are a prefix of it. ``match`` can therefore
    binary-search the longest held prefix."""

    __slots__ = ("capacity", "_lru")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a prefix index holds at least one block")
        self.capacity = int(capacity)
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, h: int) -> bool:
        return h in self._lru

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the index holds."""
        lru = self._lru
        lo, hi = 0, len(hashes)        # hashes[:lo] held; hashes[hi:] not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in lru:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def insert(self, hashes: Sequence[int]) -> None:
        lru = self._lru
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity:
            lru.popitem(last=False)


class PrefixRouter(Router):
    name = "prefix"
    reads = frozenset({"running", "waiting", "admission_budget", "num_blocks"})
    reads_prefix = True

    def __init__(self, *, index_blocks: int = 0, balance_abs: float = 8.0, balance_rel: float = 1.25,
                 **kw: Any) -> None:
        """``index_blocks``: blocks each instance's index holds (0: the instance's KV blocks
        as its load reports them, else ``DEFAULT_INDEX_BLOCKS``). ``balance_abs`` /
        ``balance_rel``: how far an instance's request count may exceed the least loaded
        candidate's (``count <= max(least + abs, least * rel)``) and keep its affinity."""
        super().__init__(**kw)
        if index_blocks < 0:
            raise ValueError("index_blocks must be >= 0")
        if not (balance_abs >= 0 and balance_rel >= 1):
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        self.index_blocks = int(index_blocks)
        self.balance_abs = float(balance_abs)
        self.balance_rel = float(balance_rel)
        self.indexes: list[PrefixIndex | None] = []
        self._hashes: Sequence[int] = ()
        self._loads: Sequence[Load] = ()
        self._cached: list[int] = []          # per instance, this decision: tokens held
        self.hits_tokens = 0                  # prompt tokens routed to an instance holding them
        self.prompt_tokens = 0

    # --- Router hooks ----------------------------------------------------------------------
    def _prepare(self, block_hashes: Sequence[int] | None) -> None:
        self._hashes = block_hashes or ()

    def _charge(self, k: int, prompt_len: int) -> int:
        cached = self._cached[k]
        self.hits_tokens += cached
        self.prompt_tokens += prompt_len
        if self._hashes:
            self._index(k).insert(self._hashes)
        return prompt_len - cached

    def _resize(self, n: int) -> None:
        super()._resize(n)
        grow = n - len(self.indexes)
        if grow > 0:
            self.indexes += [None] * grow
            self._cached += [0] * grow
        else:
            del self.indexes[n:], self._cached[n:]

    def _index(self, k: int) -> PrefixIndex:
        ix = self.indexes[k]
        if ix is None:
            ld = self._loads[k] if k < len(self._loads) else None
            cap = self.index_blocks or (ld.num_blocks if ld is not None and ld.num_blocks > 0 else 0)
            ix = self.indexes[k] = PrefixIndex(cap or DEFAULT_INDEX_BLOCKS)
        return ix

    def index_sizes(self) -> list[int]:
        return [len(ix) if ix is not None else 0 for ix in self.indexes]


    # --- the policy ------------------------------------------------------------------------
    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        hashes, bs, cached, indexes = self._hashes, self.block_size, self._cached, self.indexes
        sent_r, sent_t = (self.sent_reqs, self.sent_tokens) if self.count_sent else (None, None)
        self._loads = loads
        state: list[tuple[int, float, float, int]] = []     # (instance, requests, budget, cached)
        least = _INF
        for i in cand:
            ld = loads[i]
            reqs = ld.running + ld.waiting
            b = ld.admission_budget
            if sent_r is not None:
                reqs += sent_r[i]
                b -= sent_t[i]
            if b != b:                                       # NaN: reports no estimate
                b = -_INF
            ix = indexes[i] if hashes else None
            c = cached[i] = min(ix.match(hashes) * bs, prompt_len) if ix is not None else 0
            state.append((i, reqs, b, c))
            if reqs < least:
                least = reqs
        limit = max(least + self.balance_abs, least * self.balance_rel)
        # too far ahead of the least loaded: no credit for what it holds
        keyed = [(i, reqs, b - prompt_len + (c if reqs <= limit else 0), c if reqs <= limit else 0)
                 for i, reqs, b, c in state]
        any_covers = any(slack >= 0 for _, _, slack, _ in keyed)
        best, best_key = -1, (False, -_INF, -_INF, -_INF)
        for i, reqs, slack, c in keyed:
            key = (slack >= 0 or not any_covers, c, slack, -reqs)
            if key > best_key or best < 0:
                best, best_key = i, key
        return best
