"""The launch metadata of the prefix-prefill kernel (the kernel itself: tests/engine/test_cuda.py, GPU)."""

from __future__ import annotations

import torch

from telechat.engine.kv_cache import PrefillChunk
from telechat.engine.prefix_attention import chunk_tables


def test_chunk_tables_hold_each_chunks_rows_span_and_slots():
    """One row of ``meta`` per chunk (first row, start, token count) and its slots of positions [0, end),
    padded with zeros to the longest; the grid's size comes from the host, not from reading ``meta`` back."""
    chunks = [PrefillChunk(row=3, start=5, end=9, context_slots=torch.arange(100, 109)),
              PrefillChunk(row=7, start=1, end=3, context_slots=torch.tensor([40, 41, 42])),
              PrefillChunk(row=9, start=16, end=32, context_slots=torch.arange(200, 232))]
    tables = chunk_tables(chunks, torch.device("cpu"))
    assert tables.meta.dtype == torch.int32
    assert tables.meta.tolist() == [[3, 5, 4], [7, 1, 2], [9, 16, 16]]
    assert tables.slots.shape == (3, 32) and tables.slots.dtype == torch.int64
    assert tables.slots[0, :9].tolist() == list(range(100, 109)) and not tables.slots[0, 9:].any()
    assert tables.slots[1, :3].tolist() == [40, 41, 42] and not tables.slots[1, 3:].any()
    assert tables.slots[2].tolist() == list(range(200, 232))
    assert tables.max_tokens == 16


def test_context_partitions_split_long_contexts_only_when_programs_are_few():
    """Few programs (a chat turn or two while others decode): the context is split into whole blocks, as many
    partitions as the target allows, none empty; enough programs already: one partition over everything."""
    from telechat.engine.paged_attention import MAX_PARTITIONS
    from telechat.engine.prefix_attention import context_partitions

    for programs, max_end in [(64, 4433), (128, 9000), (512, 70000), (7, 100), (1, 1), (64, 64)]:
        parts, part_len = context_partitions(programs, max_end, 64, target_programs=1024)
        assert part_len % 64 == 0 and 1 <= parts <= MAX_PARTITIONS
        assert (parts - 1) * part_len < max_end <= parts * part_len  # covers the context, last one not empty
        assert parts <= min(MAX_PARTITIONS, max(1, 1024 // programs))
    # 16 wanted: 4433 / 16 = 277 keys, rounded up to whole blocks (320), cover it in 14
    assert context_partitions(64, 4433, 64, target_programs=1024) == (14, 320)
    assert context_partitions(1024, 4433, 64, target_programs=1024) == (1, 4480)
    assert context_partitions(2000, 100, 32, target_programs=1024) == (1, 128)
    # the default target: one chunk of ≤ 64 tokens over 32 heads in 8 partitions, two in 4, four in 2, eight whole
    assert [context_partitions(32 * c, 4433, 64)[0] for c in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
