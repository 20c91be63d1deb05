"""The paged KV cache's bookkeeping: fixed-size blocks, ref counts, and the prefix cache.

A full block is identified by a chained hash: hash(parent block's hash, its tokens), so equal
hashes mean equal whole prefixes. Freed blocks keep their hash and stay findable until they are
reused; the free queue is in eviction order (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tuili.engine.request import Request
from tuili.engine.state_cache import StateSlots


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free)} free")
        ids = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            ids.append(block)
        return ids

    def release(self, ids: list[int]) -> None:
        """Drop one reference from each block; unreferenced blocks become free (and evictable)."""
        for block in ids:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def lookup(self, hashes: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of `hashes`, each with a reference taken."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            found.append(block)
        return found

    def register(self, block: int, h: int) -> None:
        """Make a full block findable by its hash (first writer wins for duplicates)."""
        if self.enable_caching and h not in self.cached:
            self.cached[h] = block
            self.block_hash[block] = h

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None

    def reset_prefix_cache(self) -> None:
        for block in range(self.num_blocks):
            if self.ref_counts[block] == 0:
                self._forget(block)


class KVCacheManager:
    """Gives requests the blocks they need and owns each one's block table (request id ->
    block ids) and prefix-cache progress (its full blocks' chained hashes, kept across
    preemption, and how many of its blocks are registered); the pool owns block state. A hybrid
    model's requests also hold a recurrent-state slot (`states`), taken and given back with their
    blocks."""

    def __init__(self, pool: BlockPool, states: StateSlots | None = None):
        self.pool = pool
        self.states = states
        self.block_size = pool.block_size
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[int]] = {}
        self.registered: dict[str, int] = {}  # leading blocks already offered to the prefix cache

    def block_ids(self, req: Request) -> list[int]:
        """The request's block table (empty when it holds no blocks)."""
        return self.tables.get(req.request_id, [])

    def state_slot(self, req: Request) -> int | None:
        """The request's recurrent-state slot (None: the model keeps no such state)."""
        return self.states.slot(req.request_id) if self.states is not None else None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, req: Request) -> None:
        """Attach cached blocks of the request's prompt prefix and count them computed.

        The last prompt token is always recomputed (its logits are needed), so only blocks
        wholly before it can be hits."""
        if not self.pool.enable_caching or req.wants_prompt_logprobs:
            return
        hashes = self._hash_full_blocks(req, req.num_tokens - 1)
        blocks = self.pool.lookup(hashes[: (req.num_tokens - 1) // self.block_size])
        if self.states is not None:
            blocks = self._restorable(req, blocks, hashes)
        self.tables[req.request_id] = blocks
        self.registered[req.request_id] = len(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size

    def count_admission(self, req: Request) -> None:
        """Record a newly admitted request's prefix-cache lookup in the hit counters."""
        self.pool.stats.queries += req.num_prompt_tokens
        self.pool.stats.hits += req.num_computed_tokens
        req.num_cached_tokens = req.num_computed_tokens

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Ensure blocks for the request's next `num_new_tokens`; False if the pool is short."""
        table = self.tables.get(req.request_id)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(table or ())
        if need > self.pool.num_free:
            return False
        if self.states is not None and not self.states.take(req.request_id):
            return False
        if need > 0:
            blocks = self.pool.allocate(need)
            if table is None:
                self.tables[req.request_id] = blocks
            else:
                table.extend(blocks)
        if self.states is not None and self.pool.enable_caching:
            self._snapshot_prompt_end(req, num_new_tokens)
        return True

    def _restorable(self, req: Request, blocks: list[int], hashes: list[int]) -> list[int]:
        """A hybrid's prefix hit: the cached blocks up to the last one whose end has a state
        snapshot (the rest given back), its snapshot to be copied into the request's slot."""
        keep = len(blocks)
        while keep and self.states.find(hashes[keep - 1]) is None:
            keep -= 1
        self.pool.release(list(reversed(blocks[keep:])))
        if keep:
            self.states.restore[req.request_id] = self.states.find(hashes[keep - 1])
        return blocks[:keep]

    def _snapshot_prompt_end(self, req: Request, num_new_tokens: int) -> None:
        """Queue a snapshot of a hybrid's states at its prompt's last block boundary (as far as
        a later prefix hit can reach, match_prefix) when this step's chunk crosses it."""
        end = (req.num_prompt_tokens - 1) // self.block_size * self.block_size
        start = req.num_computed_tokens
        if req.wants_prompt_logprobs or not start < end <= start + num_new_tokens:
            return
        h = self._hash_full_blocks(req, end)[end // self.block_size - 1]
        self.states.save(req.request_id, end - start, h)

    def take_state_ops(self):
        """The step's queued state copies (state_cache.StateOps), or None (no states)."""
        return self.states.take_ops() if self.states is not None else None

    def free(self, req: Request) -> None:
        """Give back the request's blocks (preempted, or not admitted this step): its hashes stay
        for when it is admitted again."""
        # Release the tail first so that a prefix's later blocks are evicted before its head.
        self.pool.release(list(reversed(self.tables.pop(req.request_id, []))))
        self.registered.pop(req.request_id, None)
        if self.states is not None:
            self.states.release(req.request_id)
        req.num_computed_tokens = 0

    def trim(self, req: Request) -> None:
        """Give back the blocks past the request's computed tokens (those only rejected drafts
        had reached); nothing there is registered, as only blocks of real tokens are."""
        table = self.tables.get(req.request_id)
        if table is None:
            return
        keep = self.blocks_needed(req.num_computed_tokens)
        if len(table) > keep:
            self.pool.release(list(reversed(table[keep:])))
            del table[keep:]

    def remove(self, req: Request) -> None:
        """A finished request: its blocks given back and everything kept for it dropped."""
        self.free(req)
        self.hashes.pop(req.request_id, None)

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        table = self.tables.get(req.request_id)
        if table is None:  # preempted since
            return
        full = req.num_computed_tokens // self.block_size
        hashes = self._hash_full_blocks(req, req.num_computed_tokens)
        done = self.registered.get(req.request_id, 0)
        for i in range(done, full):
            self.pool.register(table[i], hashes[i])
        self.registered[req.request_id] = max(done, full)

    def _hash_full_blocks(self, req: Request, num_tokens: int) -> list[int]:
        """The request's chained block hashes, extended to cover its first `num_tokens`."""
        hashes = self.hashes.setdefault(req.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(chain_hash(parent, req.token_ids[i * bs:(i + 1) * bs]))
        return hashes

