"""The block allocator with automatic prefix caching (``BlockAllocator(..., prefix_caching=True)``).

A full block whose KV is computed is named by its hash (``block_hash``) and kept in a map
from name to block. Requests share a named block by reference count; when the last one
lets go, the block is *evictable*: its KV stays valid and a later request whose names
match takes it back, until an allocation that finds no free block evicts it, least
recently used first. Evictable blocks count as free (they are reclaimable), so memory
pressure looks the same to the scheduler as without caching.

Named blocks are never written: a request reusing a prefix computes from the first block
after it, and only full, computed prompt blocks are named.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from itertools import islice, takewhile
from operator import is_not

from fairbatch.kv import BlockAllocator


_is_block = partial(is_not, None)     # a name found in the map (block 0 is falsy)


class CachingBlockAllocator(BlockAllocator):
    """``BlockAllocator`` whose full blocks are reused across requests by name."""

    __slots__ = ("_ref", "_name", "_by_name", "_evictable", "_named", "prefix_queries", "prefix_hits")

    prefix_caching = True

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True) -> None:
        super().__init__(num_blocks, block_size)
        self._ref = [0] * num_blocks     # requests holding each named block (an unnamed one has one)
        self._name: list[int | None] = [None] * num_blocks
        self._by_name: dict[int, int] = {}                 # name -> its block
        # named blocks no request holds, least recently used first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._named: dict[str, int] = {}                   # request -> its leading blocks already named
        # prompt tokens looked up and found (record_lookup), as vLLM's
        # prefix_cache_queries / prefix_cache_hits count them
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- queries --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - (len(self._free) + len(self._evictable)) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks holding a named prefix, in use or evictable."""
        return len(self._by_name)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def cached_blocks(self, block_hashes: Sequence[int]) -> int:
        by_name = self._by_name
        n = 0
        for h in block_hashes:
            if h not in by_name:
                break
            n += 1
        return n

    # --- mutations ------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """As ``BlockAllocator.allocate``, evicting least recently used named blocks when
        the free ones run short. New blocks are unnamed: one holder, no count kept."""
        bs = self.block_size
        if -(-num_tokens // bs) > len(self._free):     # (else there are free blocks enough)
            table = self._tables.get(request_id)
            short = -(-num_tokens // bs) - (len(table) if table else 0) - len(self._free)
            if short > 0:
                if short > len(self._evictable):
                    return False
                # evict (inlined: a long prompt evicts a thousand blocks at once)
                pop, by_name, name, put = self._evictable.popitem, self._by_name, self._name, self._free.append
                for _ in range(short):
                    b = pop(last=False)[0]
                    del by_name[name[b]]
                    name[b] = None
                    put(b)
        return BlockAllocator.allocate(self, request_id, num_tokens)

    def free(self, request_id: str) -> int:
        table = self._tables.pop(request_id, None)
        self._named.pop(request_id, None)
        if not table:
            return 0
        ref, name, put, evictable = self._ref, self._name, self._free.append, self._evictable
        # last block first: a prefix's tail is evicted before its head, which every
        # longer match needs
        for b in reversed(table):
            if name[b] is None:
                put(b)
            else:
                r = ref[b] - 1
                ref[b] = r
                if not r:
                    evictable[b] = None
        return len(table)

    def attach_prefix(self, request_id: str, block_hashes: Sequence[int], num_tokens: int) -> int:
        if self._tables.get(request_id):
            raise ValueError(f"request {request_id} already holds blocks")
        # the cached blocks of the longest cached prefix, found at C speed (no copy of the
        # names: a miss on a 15k-token prompt costs one probe)
        table = list(takewhile(_is_block, map(self._by_name.get,
                                              islice(block_hashes, (num_tokens - 1) // self.block_size))))
        if not table:
            return 0
        ref, evictable = self._ref, self._evictable
        for b in table:
            r = ref[b]
            if not r:
                del evictable[b]
            ref[b] = r + 1
        self._tables[request_id] = table
        self._named[request_id] = len(table)
        return len(table) * self.block_size

    def record_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries += queried
        self.prefix_hits += hit

    def register(self, request_id: str, block_hashes: Sequence[int], num_computed: int) -> None:
        # most calls (a request visited after a step that completed none of its blocks) end
        # at the first test
        done = self._named.get(request_id, 0)
        full = num_computed // self.block_size
        if full <= done:
            return
        table = self._tables.get(request_id)
        if not table:
            return
        full = min(full, len(block_hashes), len(table))
        if full <= done:
            return
        by_name, name, ref = self._by_name, self._name, self._ref
        for i in range(done, full):
            h = block_hashes[i]
            if h not in by_name:          # else another request computed it too: ours stays unnamed
                b = table[i]
                by_name[h] = b
                name[b] = h
                ref[b] = 1
        self._named[request_id] = full

    def check_invariants(self) -> None:
        """Named blocks' reference counts match the tables, unnamed ones have one holder
        at most; every block is free, evictable or held; names and the name map agree;
        only unheld named blocks are evictable."""
        held = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"request {rid} holds a block twice")
            for b in table:
                held[b] += 1
            if self._named.get(rid, 0) > len(table):
                raise AssertionError(f"request {rid} has more named blocks than blocks")
        for b in range(self.num_blocks):
            if self._ref[b] != (held[b] if self._name[b] is not None else 0) or held[b] > 1 and self._name[b] is None:
                raise AssertionError(f"block {b}: reference count {self._ref[b]}, held {held[b]} times")
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable:
            raise AssertionError("a block is free twice, or both free and evictable")
        for b in range(self.num_blocks):
            kinds = (b in free) + (b in evictable) + (held[b] > 0)
            if kinds != 1:
                raise AssertionError(f"block {b} is in {kinds} of free / evictable / held")
            named = self._name[b] is not None
            if (b in free and named) or (b in evictable and not named):
                raise AssertionError(f"block {b}: free blocks are unnamed, evictable ones named")
            if named and self._by_name.get(self._name[b]) != b:
                raise AssertionError(f"block {b}'s name does not map back to it")
        if len(self._by_name) != sum(n is not None for n in self._name):
            raise AssertionError("the name map holds a block that is not named")
