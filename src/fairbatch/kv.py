"""Paged KV-cache accounting shared by the simulator and the engine.

Block ids are real: the engine indexes its KV tensors with exactly the blocks handed
out here. How many blocks there are is ``specs.kv_cache_blocks`` for both the simulator
(from a GPU preset) and the engine (from the device's memory), with the same activation
reserve, so the simulator's memory pressure is the engine's.

``prefix_caching=True`` gives a ``prefix_cache.CachingBlockAllocator``: the same
interface, plus reuse of full blocks whose names (``prompt_block_hashes``,
``trace_block_hashes``) match; docs/PREFIX_CACHING.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from fairbatch.block_hash import prompt_block_hashes, trace_block_hashes

__all__ = ["BlockAllocator", "check_fits", "prompt_block_hashes", "trace_block_hashes"]


class BlockAllocator:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` token slots each."""

    __slots__ = ("num_blocks", "block_size", "_free", "_tables")

    # without prefix caching nothing is ever reused (the caching allocator overrides these)
    prefix_caching = False
    prefix_queries = 0
    prefix_hits = 0

    def __new__(cls, *args: object, prefix_caching: bool = False, **kwargs: object) -> BlockAllocator:
        if prefix_caching and cls is BlockAllocator:
            from fairbatch.prefix_cache import CachingBlockAllocator
            cls = CachingBlockAllocator
        return super().__new__(cls)

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first (warm in cache on the engine).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    # --- queries --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_allocated(self, request_id: str) -> int:
        t = self._tables.get(request_id)
        return len(t) if t is not None else 0

    # --- mutations ------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold ``num_tokens`` tokens. All or nothing."""
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = []
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        free = self._free
        if need > len(free):
            if not table:
                del self._tables[request_id]
            return False
        if need == 1:
            table.append(free.pop())
        else:
            cut = len(free) - need
            table.extend(reversed(free[cut:]))
            del free[cut:]
        return True

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks to the pool; returns how many."""
        table = self._tables.pop(request_id, None)
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    # --- prefix caching (a no-op here; prefix_cache.CachingBlockAllocator) --------------------
    def attach_prefix(self, request_id: str, block_hashes: Sequence[int], num_tokens: int) -> int:
        """Give a request holding no blocks the cached blocks of its longest cached prefix
        (at most ``(num_tokens - 1) // block_size``, so a token is left to compute);
        returns the tokens they hold."""
        return 0

    def record_lookup(self, queried: int, hit: int) -> None:
        """Count a request's prompt tokens looked up in the cache, and found, when it is
        first scheduled (``prefix_queries``, ``prefix_hits``)."""

    def register(self, request_id: str, block_hashes: Sequence[int], num_computed: int) -> None:
        """The request's first ``num_computed`` tokens have KV: name its full blocks among
        them so that later requests can reuse them."""

    def cached_blocks(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` are cached (a query, nothing taken)."""
        return 0

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one request (tests use this)."""
        owned = [b for t in self._tables.values() for b in t]
        seen = set(owned) | set(self._free)
        if len(owned) + len(self._free) != self.num_blocks or len(seen) != self.num_blocks:
            raise AssertionError("block allocator lost or duplicated blocks")


def check_fits(prompt_len: int, max_tokens: int, max_model_len: int, block_size: int, num_blocks: int) -> None:
    """Raise ValueError if a request can never run: its prompt leaves no room in the
    context for one output token, or its tokens (cut to the context) need more KV blocks
    than the cache has. The one check of the scheduler, the engine and the server; each
    turns the error into its own (the server: a 400)."""
    if prompt_len > max_model_len - 1:
        raise ValueError(f"prompt of {prompt_len} tokens exceeds the context limit of {max_model_len} tokens "
                         "(leaving room for one output token)")
    blocks = -(-min(prompt_len + max_tokens, max_model_len) // block_size)
    if blocks > num_blocks:
        raise ValueError(f"a request of {prompt_len} + {max_tokens} tokens needs {blocks} KV blocks, "
                         f"the cache has {num_blocks}")
