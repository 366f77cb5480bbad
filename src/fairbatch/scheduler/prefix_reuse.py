"""The scheduler's side of prefix caching (docs/PREFIX_CACHING.md), shared by every policy.

A waiting request takes the cached blocks of its prompt's longest cached prefix when it is
queued, again after a preemption, and before a policy sizes its chunk at admission: it then
computes, and every policy prices, only the rest. Those waiting requests *pin* their
blocks; when KV runs short the pinned prefixes are given back, the most recently taken
first, so they never block an admission nor cause a preemption. Taking or giving back
changes a waiting request's work left, which policies that order prompts by it are told
(``work_changed``). After each step the prompt blocks computed so far are named, so later
requests can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable

from fairbatch.kv import BlockAllocator
from fairbatch.request import Request, RequestState

_RUNNING = RequestState.RUNNING


class PrefixReuse:
    __slots__ = ("allocator", "work_changed", "pinned", "naming")

    def __init__(self, allocator: BlockAllocator, work_changed: Callable[[Request], None]) -> None:
        self.allocator = allocator
        self.work_changed = work_changed        # called with a waiting request whose num_computed changed
        self.pinned: dict[str, Request] = {}    # waiting requests holding a prefix, in the order taken
        # running ones with prompt blocks yet to name, in the order entered (when two computed
        # the same block, the first names its copy) -> [the request, its num_computed when
        # last named (-1: not yet)]
        self.naming: dict[str, list] = {}

    def take(self, req: Request) -> None:
        """``req``, waiting and holding no KV, takes its longest cached prefix."""
        hashes = req.block_hashes
        if hashes is None or req.kv_slots:
            return
        hit = self.allocator.attach_prefix(req.request_id, hashes, req.prompt_len + req.generated)
        if hit:
            req.num_computed = req.kv_slots = hit
            self.pinned[req.request_id] = req
            self.work_changed(req)

    def give_back(self, req: Request, num_tokens: int) -> bool:
        """KV ran short for ``req``: waiting requests other than ``req`` give back their
        prefixes, the most recently taken first (they take them again when next
        considered), until ``req``'s blocks fit; True if they now do."""
        alloc = self.allocator
        need = alloc.blocks_for(num_tokens) - alloc.num_allocated(req.request_id)
        pinned = self.pinned
        for rid in reversed(list(pinned)):
            if alloc.num_free >= need:
                break
            other = pinned[rid]
            if other is req:
                continue
            del pinned[rid]
            alloc.free(rid)
            other.num_computed = other.kv_slots = 0
            self.work_changed(other)
        return alloc.num_free >= need

    def admitted(self, req: Request) -> None:
        """``req`` runs: its blocks are its own now, and its prompt blocks get named; at
        its first admission, what the cache saved it is counted."""
        rid = req.request_id
        self.pinned.pop(rid, None)
        self.naming[rid] = [req, -1]   # one still entered (it left and came back since the last naming) keeps its place
        if req.admitted_at < 0:
            req.num_cached_tokens = req.num_computed
            self.allocator.record_lookup(req.prompt_len, req.num_computed)

    def name_computed_blocks(self) -> None:
        """After a step (before its finished requests free their blocks): the prompt blocks
        it completed become reusable by later requests. Every entered request is looked at,
        in the order entered, but only one whose ``num_computed`` moved since it was last
        named (the step ran it, or it is new) can have completed a block: the others are
        passed over without asking the allocator."""
        register, bs = self.allocator.register, self.allocator.block_size
        done = None
        for rid, entry in self.naming.items():
            req = entry[0]
            if req.state is _RUNNING:
                c = req.num_computed
                if c == entry[1]:
                    continue
                entry[1] = c
                hashes = req.block_hashes
                register(rid, hashes, c)
                if c < len(hashes) * bs:
                    continue
            if done is None:
                done = []
            done.append(rid)   # all named, or it left (preempted ones come back at admission)
        if done:
            for rid in done:
                del self.naming[rid]
