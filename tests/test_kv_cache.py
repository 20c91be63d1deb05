"""BlockPool and KVCacheManager bookkeeping."""

from tuili.engine.kv_cache import BlockPool, KVCacheManager, chain_hash
from tuili.engine.request import Request
from tuili.sampling_params import SamplingParams


def request(tokens, rid="r"):
    return Request(rid, tokens, SamplingParams(), frozenset())


def test_allocate_release_and_ref_counts():
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.ref_counts[b] == 1 for b in a)
    pool.release(a)
    assert pool.num_free == 4 and pool.usage == 0.0


def test_chained_hash_depends_on_the_whole_prefix():
    h1 = chain_hash(None, [1, 2])
    assert chain_hash(h1, [3, 4]) != chain_hash(chain_hash(None, [9, 9]), [3, 4])
    assert chain_hash(h1, [3, 4]) == chain_hash(chain_hash(None, [1, 2]), [3, 4])


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    kv = KVCacheManager(BlockPool(8, 2))
    first = request([1, 2, 3, 4, 5])
    kv.match_prefix(first)
    assert first.num_computed_tokens == 0
    assert kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_computed_blocks(first)
    second = request([1, 2, 3, 4, 5], "s")
    kv.match_prefix(second)
    # Blocks [1,2] and [3,4] hit; token 5 must be recomputed for its logits.
    assert kv.block_ids(second) == kv.block_ids(first)[:2] and second.num_computed_tokens == 4
    assert kv.pool.ref_counts[kv.block_ids(first)[0]] == 2
    whole_blocks = request([1, 2, 3, 4], "t")
    kv.match_prefix(whole_blocks)
    assert whole_blocks.num_computed_tokens == 2  # the block holding the last token is recomputed


def test_freed_blocks_stay_cached_until_reused():
    kv = KVCacheManager(BlockPool(3, 2))
    a = request([1, 2, 3, 4, 5])
    kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.cache_computed_blocks(a)
    blocks = list(kv.block_ids(a))
    kv.free(a)
    assert kv.pool.num_free == 3
    b = request([1, 2, 3, 4, 9], "b")
    kv.match_prefix(b)
    assert kv.block_ids(b) == blocks[:2]
    kv.free(b)
    # Eviction order: the tail block (freed first) goes before the prefix's head.
    c = request([7, 7, 7], "c")
    kv.allocate(c, 3)
    assert blocks[0] not in kv.block_ids(c)
    d = request([1, 2, 3, 4, 9], "d")
    kv.match_prefix(d)
    assert kv.block_ids(d) == [blocks[0]]  # head survived, the evicted second block did not


def test_allocate_refuses_when_short():
    kv = KVCacheManager(BlockPool(2, 4))
    r = request(list(range(12)))
    assert not kv.allocate(r, 12)
    assert kv.block_ids(r) == [] and kv.pool.num_free == 2


def test_hashes_outlive_preemption_and_go_with_the_finished_request():
    kv = KVCacheManager(BlockPool(4, 2))
    a = request([1, 2, 3, 4, 5])
    kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.cache_computed_blocks(a)
    assert kv.hashes["r"] == [chain_hash(None, [1, 2]), chain_hash(chain_hash(None, [1, 2]), [3, 4])]
    assert kv.registered["r"] == 2
    kv.free(a)  # preempted: blocks back, hashes kept for its readmission
    assert kv.pool.num_free == 4 and a.num_computed_tokens == 0 and "r" not in kv.registered
    kv.cache_computed_blocks(a)  # a step read back after the preemption registers nothing
    kv.match_prefix(a)  # readmitted: its own blocks are still cached
    assert a.num_computed_tokens == 4 and kv.registered["r"] == 2 and len(kv.hashes["r"]) == 2
    kv.remove(a)
    assert not kv.tables and not kv.hashes and not kv.registered and kv.pool.num_free == 4
