"""Model runner: forward passes over the paged KV cache.

Two kinds of pass per engine step:

* **decode** — one token for each of B sequences. Metadata is a handful of fixed-shape tensors
  (tokens, positions, cache slots, block tables, lengths, RoPE rows), so on CUDA the whole pass is
  captured once per batch-size bucket in a CUDA graph and replayed (no per-layer launch cost);
  attention reads only each sequence's live KV (Triton paged kernel; gather + SDPA on CPU).
* **prefill** — chunks of prompts, run eagerly: linear layers see all tokens at once (``[T, H]``),
  attention is per sequence (SDPA/flash causal for a fresh prompt, masked over the gathered
  context for later chunks).

Each sequence carries its own RoPE parameters, fixed when it was first prefilled.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from telechat.engine.kv_cache import PagedKVCache, PrefillChunk, StepAttention
from telechat.engine.paged_attention import partition_size
from telechat.model.rope import RopeParams, cos_sin, inv_freq

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512)
SCRATCH_SLOT = 0  # block 0 is never allocated: padded graph rows write their KV there


@dataclass
class StepInput:
    """What one sequence contributes to a step: tokens at positions ``[start, start+len(tokens))``."""

    tokens: list[int]
    start: int
    blocks: list[int]
    rope: RopeParams
    row: int = 0
    """The sequence's stable row (0 ≤ row < max_rows): its block table lives there between steps."""


class RopeTable:
    """Rotary inverse frequencies of every base in use, one row each, on the model's device.

    Decode passes index it by row, so a captured graph serves sequences with any NTK factor.
    """

    def __init__(self, head_dim: int, device: torch.device, rows: int = 64):
        self.head_dim = head_dim
        self.table = torch.zeros(rows, head_dim // 2, dtype=torch.float32, device=device)
        self._rows: dict[float, int] = {}

    def row(self, base: float) -> int:
        """Row of ``base``, added on first use."""
        idx = self._rows.get(base)
        if idx is None:
            idx = len(self._rows)
            if idx >= self.table.shape[0]:
                raise RuntimeError("too many distinct RoPE bases in flight")
            self.table[idx] = inv_freq(base, self.head_dim, self.table.device)
            self._rows[base] = idx
        return idx


class DecodeBuffers:
    """Fixed-address inputs of the decode pass (the first ``b`` entries serve a batch of b).

    Per-token metadata travels in one int64 host→device copy from a pinned staging buffer
    (tokens, positions, slots, seq_lens, rope_rows, table rows). Block tables stay on the device
    between steps, one row per sequence; only blocks appended since the last step are copied.
    """

    FIELDS = ("tokens", "positions", "slots", "seq_lens", "rope_rows", "table_rows")

    def __init__(self, max_batch: int, max_rows: int, max_blocks: int, device: torch.device):
        pin = device.type == "cuda"
        self.meta = torch.zeros(len(self.FIELDS), max_batch, dtype=torch.long, device=device)
        self.mscale = torch.ones(max_batch, dtype=torch.float32, device=device)
        self.host_meta = torch.zeros(len(self.FIELDS), max_batch, dtype=torch.long, pin_memory=pin)
        self.host_mscale = torch.ones(max_batch, dtype=torch.float32, pin_memory=pin)
        # Row `max_rows` stays all zeros: padding entries of a bucket point at it (scratch block 0).
        self.tables = torch.zeros(max_rows + 1, max_blocks, dtype=torch.int32, device=device)
        self.host_tables = torch.zeros(max_rows + 1, max_blocks, dtype=torch.int32, pin_memory=pin)
        self.scratch_row = max_rows
        self.synced = [0] * max_rows  # blocks of each row already on the device

    def view(self, b: int) -> dict[str, torch.Tensor]:
        """Device views of the first ``b`` entries, by field name."""
        return {**{name: self.meta[i, :b] for i, name in enumerate(self.FIELDS)}, "mscale": self.mscale[:b]}

    def sync_blocks(self, row: int, blocks: list[int]) -> None:
        """Stage and copy the blocks of ``row`` that the device does not have yet."""
        done = self.synced[row]
        if done < len(blocks):
            self.host_tables[row, done : len(blocks)] = torch.tensor(blocks[done:], dtype=torch.int32)
            self.tables[row, done : len(blocks)].copy_(self.host_tables[row, done : len(blocks)], non_blocking=True)
            self.synced[row] = len(blocks)

    def upload(self, b: int) -> None:
        """Copy the staged entries ``[:b]`` to the device (asynchronous, ordered before the pass)."""
        self.meta[:, :b].copy_(self.host_meta[:, :b], non_blocking=True)
        self.mscale[:b].copy_(self.host_mscale[:b], non_blocking=True)


class ModelRunner:
    """Runs :class:`~telechat.model.modeling.TelechatForCausalLM` weights over the paged cache."""

    def __init__(self, model, cache: PagedKVCache, *, max_num_seqs: int, max_model_len: int, max_rows: int,
                 cuda_graphs: bool | None = None, compile: bool = False):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.head_dim = model.config.head_dim
        self.block_size = cache.block_size
        self.max_blocks = math.ceil(max_model_len / cache.block_size)
        self.partition = partition_size(max_model_len)
        self.rope = RopeTable(self.head_dim, self.device)
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.buffers = DecodeBuffers(self.buckets[-1], max_rows, self.max_blocks, self.device)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = {} if use_graphs else None
        self._pool = None
        # Optional: torch.compile with dynamic batch sizes took ~4 min to start the 7B on an H100 and was
        # slower at batch 64 than the fused-kernel eager pass (bench/RESULTS.md), so it is opt-in.
        self.compile = compile
        self._decode_fn = torch.compile(self._decode_pass, dynamic=True) if self.compile else self._decode_pass

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def forward(self, decodes: list[StepInput], prefills: list[StepInput]) -> torch.Tensor:
        """Logits ``[len(decodes) + len(prefills), V]`` at the last token of each input, decodes first."""
        parts = []
        if decodes:
            parts.append(self._decode(decodes))
        if prefills:
            parts.append(self._prefill(prefills))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def capture_graphs(self) -> None:
        """Capture the decode pass for every batch bucket (CUDA only; done once at start)."""
        if self.graphs is None:
            return
        self.rope.row(self.model.transformer.rotary.params(1).base)
        self._pool = torch.cuda.graph_pool_handle()
        if self.compile:
            try:
                with torch.inference_mode():
                    self._decode_body(self.buckets[-1])
            except Exception:  # noqa: BLE001 - a compiler failure must not stop serving
                log.exception("torch.compile of the decode pass failed; capturing the eager pass instead")
                self.compile, self._decode_fn = False, self._decode_pass
        with torch.inference_mode():
            for b in reversed(self.buckets):
                for _ in range(2):  # warm-up: compiles kernels, creates cuBLAS handles
                    self._decode_body(b)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._decode_body(b)
                self.graphs[b] = (graph, out)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    # ------------------------------------------------------------------ decode

    def forget_row(self, row: int) -> None:
        """The sequence that held ``row`` released its blocks; the next one starts from none."""
        self.buffers.synced[row] = 0

    def _decode(self, decodes: list[StepInput]) -> torch.Tensor:
        n = len(decodes)
        b = next((x for x in self.buckets if x >= n), n) if self.graphs is not None else n
        bs = self.block_size
        buf = self.buffers
        cols: list[list[int]] = [[] for _ in buf.FIELDS]
        mscale = []
        for d in decodes:
            p = d.start
            buf.sync_blocks(d.row, d.blocks)
            for col, value in zip(cols, (d.tokens[0], p, d.blocks[p // bs] * bs + p % bs, p + 1,
                                         self.rope.row(d.rope.base), d.row)):
                col.append(value)
            mscale.append(d.rope.mscale)
        pad = b - n
        # Padding entries read one token of the scratch block through the all-zero scratch row.
        for col, fill in zip(cols, (0, 0, SCRATCH_SLOT, 1, 0, buf.scratch_row)):
            col.extend([fill] * pad)
        buf.host_meta[:, :b] = torch.tensor(cols)
        buf.host_mscale[:b] = torch.tensor(mscale + [1.0] * pad)
        buf.upload(b)
        if self.graphs is not None and b in self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
            return out[:n]
        return self._decode_body(b)[:n]

    def _decode_body(self, b: int) -> torch.Tensor:
        v = self.buffers.view(b)
        return self._decode_fn(v["tokens"], v["positions"], v["slots"], self.buffers.tables[v["table_rows"]],
                               v["seq_lens"].to(torch.int32), v["rope_rows"], v["mscale"])

    def _decode_pass(self, tokens, positions, slots, block_tables, seq_lens, rope_rows, mscale) -> torch.Tensor:
        step = StepAttention(cache=self.cache, write_slots=slots, decode_rows=tokens.shape[0],
                             block_tables=block_tables, seq_lens=seq_lens, partition=self.partition, prefills=[])
        return self._body(tokens, positions, self.rope.table[rope_rows], mscale, step)

    # ------------------------------------------------------------------ prefill

    def _prefill(self, prefills: list[StepInput]) -> torch.Tensor:
        dev = self.device
        tokens, positions, slots, freqs, mscales, last_rows = [], [], [], [], [], []
        chunks: list[PrefillChunk] = []
        row = 0
        for inp in prefills:
            n, end = len(inp.tokens), inp.start + len(inp.tokens)
            tokens.extend(inp.tokens)
            positions.append(torch.arange(inp.start, end))
            slots.append(self.cache.slots(inp.blocks, inp.start, end, "cpu"))
            freqs.append(inv_freq(inp.rope.base, self.head_dim).expand(n, -1))
            mscales.append(torch.full((n,), inp.rope.mscale))
            ctx = self.cache.slots(inp.blocks, 0, end, dev) if inp.start else None
            chunks.append(PrefillChunk(row=row, start=inp.start, end=end, context_slots=ctx))
            row += n
            last_rows.append(row - 1)
        step = StepAttention(cache=self.cache, write_slots=torch.cat(slots).to(dev), decode_rows=0,
                             block_tables=None, seq_lens=None, partition=self.partition, prefills=chunks)
        return self._body(torch.tensor(tokens, device=dev), torch.cat(positions).to(dev), torch.cat(freqs).to(dev),
                          torch.cat(mscales).to(dev), step, torch.tensor(last_rows, device=dev))

    # ------------------------------------------------------------------ shared body

    def _body(self, tokens, positions, freqs, mscale, step: StepAttention, last_rows=None) -> torch.Tensor:
        cos, sin = cos_sin(positions, freqs, mscale, self.dtype)
        t = self.model.transformer
        x = t.word_embeddings(tokens)
        if t.word_embeddings_layernorm is not None:
            x = t.word_embeddings_layernorm(x)
        for block in t.h:
            x = block(x, cos, sin, None, step)
        if last_rows is not None:
            x = x[last_rows]
        return self.model.lm_head(t.ln_f(x)).float()
