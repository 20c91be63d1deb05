"""A step's flat host inputs shared by the eager path and the CUDA graphs: block tables, slots."""

from __future__ import annotations


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
