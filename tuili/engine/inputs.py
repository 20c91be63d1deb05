"""A step's flat host inputs shared by the eager path and the CUDA graphs: block tables, slots."""

from __future__ import annotations

from dataclasses import dataclass, field


def pad_tables(tables: list[list[int]]) -> list[list[int]]:
    """Block tables as rows of one width (the widest), padded with block 0 (never read)."""
    width = max(len(t) for t in tables)
    return [t + [0] * (width - len(t)) for t in tables]


def add_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the cache slots of positions start..end-1: one contiguous run per block."""
    pos = start
    while pos < end:
        block = pos // block_size
        stop = min(end, (block + 1) * block_size)
        shift = (table[block] - block) * block_size  # slot = position + shift within the block
        slots.extend(range(pos + shift, stop + shift))
        pos = stop


@dataclass
class StepInputs:
    """A step's flat host inputs: all a rank needs to run the model on it (tensor-parallel ranks
    get them from rank 0, distributed/channel.py). Rows: decodes first, then prefill chunks."""
    ids: list[int]  # 0 where the token is still on the device (feed)
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]
    seq_lens: list[int]
    seqs: list[tuple[int, int, int]]  # per sequence: first row, new tokens, cached tokens
    num_decodes: int
    sample_rows: list[int]
    prompt_rows: list[tuple[int, int]] = field(default_factory=list)  # (first row, rows)
    pool_seqs: list[tuple[int, int]] = field(default_factory=list)  # (first row, rows)
    # (rows here, rows of the last step's device tokens) of ids not read back yet
    feed: tuple[list[int], list[int]] = ([], [])
    num_device_tokens: int = 0  # rows in that tensor (a rank's copy of it is this long)
    state_slots: list[int] = field(default_factory=list)  # per sequence (a hybrid model's)
    # its prefix-cache snapshots: (snapshot, slot) copies before the step; (sequence, tokens
    # into its chunk, snapshot) states taken part-way
    state_restores: list[tuple[int, int]] = field(default_factory=list)
    state_saves: list[tuple[int, int, int]] = field(default_factory=list)
