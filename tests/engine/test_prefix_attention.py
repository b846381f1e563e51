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
