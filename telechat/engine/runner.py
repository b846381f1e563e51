"""Model runner: one engine step on the device (docs/engine.md, One step and Overlap of host and device).

:meth:`ModelRunner.execute` turns a :class:`~telechat.engine.scheduler_output.SchedulerOutput` into
one flat batch — decodes first (one token each), then prefill chunks — runs the model's
``forward_batch`` over the paged KV cache, samples on the device and returns a :class:`StepResult`
at once; the host reads the tokens one step later. What the host sends per step is one int64
copy (input ids, positions, state rows, new block-table entries); everything else a sequence needs
lives on the device in its *row* (block table, RoPE row and ``mscale``, penalty presence mask),
set when the scheduler admits it.

* **decode-only steps** replay a CUDA graph captured per batch-size bucket; its inputs are
  fixed-address buffers filled by device copies, padding entries write to scratch block 0.
* **steps with prefill chunks** run eagerly: a fresh chunk attends causally to itself, a chunk
  that starts later (chunked prefill, prefix-cache hit) to its context read from the cache.
* A decode whose input the host has not seen yet (``from_previous``) takes it from the previous
  step's sampled ids on the device; a failed id (-1) is fed as 0, its request ends at the update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from telechat.engine.guided import allowed_tokens
from telechat.engine.kv_cache import PagedKVCache, PrefillChunk, StepAttention
from telechat.engine.request import Request
from telechat.engine.sampling import adjust_logits, needs_adjusting, sample_on_device, to_device, top_logprobs
from telechat.engine.scheduler_output import SchedulerOutput
from telechat.model.forward_batch import ForwardBatch
from telechat.model.kernels import GEMV_MAX_M, tune_gemv
from telechat.model.lora import LoraSlots
from telechat.model.rope import inv_freq

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512)
FAILED = -1
"""Sampled id of a row whose sampling failed."""


class RopeTable:
    """Rotary inverse frequencies of every base in use, one row each, on the model's device.

    Tokens index it through their sequence's row, so a captured graph serves any NTK factor.
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
            self.table[idx] = to_device(inv_freq(base, self.head_dim), torch.float32, self.table.device)
            self._rows[base] = idx
        return idx


@dataclass
class _Staged:
    """One step's inputs on the device (views of one host-to-device copy)."""

    inputs: torch.Tensor
    """``[3, T]``: input ids (0 where ``from_previous``), positions, rows."""
    prev_dst: torch.Tensor
    """Tokens (``from_previous`` decodes) whose input id is one the previous step sampled ..."""
    prev_src: torch.Tensor
    """... namely the one at this index of that step's sampled ids."""
    table_update: torch.Tensor
    """``[3, U]``: row, column, block id of the block-table entries new in this step."""
    wanted: torch.Tensor
    """Tokens whose logits are sampled, in ``sched.sampled`` order."""
    all_decodes_sample: bool
    """The wanted tokens are exactly the decodes, in order (the usual decode step)."""
    prefills: list[tuple[int, int, int, int]]
    """Per prefill chunk: first token in the flat batch, start, end, row."""


@dataclass
class StepResult:
    """What one :meth:`ModelRunner.execute` sampled, on its way to the host."""

    host_ids: torch.Tensor
    """``[S]`` int64 (pinned on CUDA), filled when ``ready`` has passed; -1 = failed."""
    ready: torch.cuda.Event | None = None
    logits: torch.Tensor | None = None
    """``[S, V]`` float32 logits of the sampled rows, before penalties (valid until the next execute)."""
    logprob_rows: list[int] | None = None
    """Indices (in ``sched.sampled``) of the rows whose request asked for log-probabilities ..."""
    host_logprobs: torch.Tensor | None = None
    """... their ``[R, 1 + k]`` log-probabilities (the sampled token's, then the top ``k``) ..."""
    host_top_ids: torch.Tensor | None = None
    """... and ``[R, k]`` top token ids (pinned on CUDA, filled when ``ready`` has passed)."""

    def tokens(self) -> list[int | None]:
        """One entry per ``sched.sampled`` chunk: the token, or None where that row's sampling failed.
        Waits for the step's device work."""
        if self.ready is not None:
            self.ready.synchronize()
        return [None if t == FAILED else t for t in self.host_ids.tolist()]

    def logprobs(self, wanted: list[int | None]) -> list[tuple[float, list[int], list[float]] | None] | None:
        """One entry per ``sched.sampled`` chunk: ``(logprob, top ids, top logprobs)`` of the rows that
        asked (``wanted[i]`` alternatives), else None; None when no row asked. Call after :meth:`tokens`."""
        if not self.logprob_rows:
            return None
        out: list = [None] * len(wanted)
        values, ids = self.host_logprobs.tolist(), self.host_top_ids.tolist()
        for r, i in enumerate(self.logprob_rows):
            k = wanted[i] or 0
            out[i] = (values[r][0], ids[r][:k], values[r][1 : 1 + k])
        return out


class ModelRunner:
    """Runs :class:`~telechat.model.modeling.TelechatForCausalLM` over the paged cache, one step at a time.

    ``num_rows`` is how many request rows the scheduler hands out (``Request.row``); ``seed`` seeds
    the generator shared by requests without their own seed. The model's projections are fused
    (:meth:`~telechat.model.modeling.TelechatForCausalLM.fuse_projections`) on construction.
    """

    def __init__(self, model, cache: PagedKVCache, *, max_num_seqs: int, max_model_len: int, num_rows: int,
                 seed: int = 0, cuda_graphs: bool | None = None, compile: bool = False, max_loras: int = 0,
                 max_lora_rank: int = 64):
        model.fuse_projections()
        self.model = model
        self.cache = cache
        param = next(model.parameters())
        self.device = param.device
        self.vocab_size = model.config.vocab_size
        self.block_size = cache.block_size
        self.max_blocks = math.ceil(max_model_len / cache.block_size)
        self.num_rows = num_rows
        self.scratch_row = num_rows
        """All-zero block table (scratch block 0), default RoPE: what padded graph entries point at."""
        dev = self.device
        self.tables = torch.zeros(num_rows + 1, self.max_blocks, dtype=torch.int32, device=dev)
        self.rope = RopeTable(model.config.head_dim, dev)
        self.rope.row(model.rope_params(1).base)  # row 0: the base of short prompts
        self.row_rope = torch.zeros(num_rows + 1, dtype=torch.long, device=dev)
        self.row_mscale = torch.ones(num_rows + 1, dtype=torch.float32, device=dev)
        self.lora = LoraSlots(model, max_loras, max_lora_rank) if max_loras else None
        """Per-request LoRA adapter slots (``max_loras`` > 0); the decode graphs capture the LoRA path."""
        self.row_lora = torch.full((num_rows + 1,), -1, dtype=torch.long, device=dev)
        """Each row's LoRA slot (-1: base model); a fixed-address buffer, read inside the decode graphs."""
        self.presence = torch.zeros(num_rows, self.vocab_size, dtype=torch.bool, device=dev)
        """Tokens seen per row (prompt + output), kept for rows whose request has a repetition penalty."""
        self.output_counts: torch.Tensor | None = None
        """``[num_rows, V]`` int32 count of each token in each row's output, allocated when a request
        first has a frequency or presence penalty and kept for such rows."""
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self._synced = [0] * num_rows  # leading blocks of each row's table already on the device
        self._generators: dict[int, torch.Generator] = {}
        self._block_offsets = torch.arange(cache.block_size, device=dev)
        self._prev_ids = torch.empty(0, dtype=torch.long, device=dev)
        self._prev_index: dict[Request, int] = {}
        self.buckets = [b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        use_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = {} if use_graphs else None
        self._base_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """With LoRA slots: the decode graphs without the LoRA path, replayed when no row has an adapter."""
        # Fixed-address inputs of decode-only steps: input ids, positions, rows; padding = scratch row.
        self._inputs = torch.zeros(3, self.buckets[-1], dtype=torch.long, device=dev)
        self._inputs[2] = self.scratch_row
        # Optional: torch.compile with dynamic batch sizes took ~4 min to start the 7B on an H100 and was
        # slower at batch 64 than the fused-kernel eager pass (bench/RESULTS.md), so it is opt-in.
        self.compile = compile
        self._decode_fn = torch.compile(self._decode_pass, dynamic=True) if compile else self._decode_pass

    # ------------------------------------------------------------------ start-up

    def capture_graphs(self) -> None:
        """On CUDA: pick cuBLAS or the Triton GEMV per decode shape (timed), then capture the decode pass
        of every batch bucket in a CUDA graph. Done once, before serving."""
        if self.device.type == "cuda":
            for row in tune_gemv(self.model, [b for b in self.buckets if b <= GEMV_MAX_M]):
                log.debug("GEMV %s", row)
        if self.graphs is None:
            return
        if self.compile:
            try:
                with torch.inference_mode():
                    self._decode_body(self.buckets[-1])
            except Exception:  # noqa: BLE001 - a compiler failure must not stop serving
                log.exception("torch.compile of the decode pass failed; capturing the eager pass instead")
                self.compile, self._decode_fn = False, self._decode_pass
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(self.buckets):
                for lora in (True, False) if self.lora is not None else (True,):
                    for _ in range(2):  # warm-up: compiles kernels, creates cuBLAS handles
                        self._decode_body(b, lora)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._decode_body(b, lora)
                    (self.graphs if lora else self._base_graphs)[b] = (graph, out)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, guide: Callable[[], torch.Tensor | None] | None = None) -> StepResult:
        """Queue step ``sched`` on the device and return without waiting for it (see the module doc).

        ``guide`` (structured output) is called once the forward pass is queued, before sampling: it
        returns the ``[S, W]`` int32 token bitmask of the sampled rows (or None), built on the host
        while the device computes (docs/engine.md, "Constrained decoding")."""
        self._update_rows(sched)
        if sched.empty:
            return StepResult(torch.empty(0, dtype=torch.long))
        num_decodes = len(sched.decodes)
        bucket = None
        if not sched.prefills and self.graphs is not None and num_decodes <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= num_decodes)
        step = self._stage(sched, bucket)
        if step.table_update.numel():
            self.tables[step.table_update[0], step.table_update[1]] = step.table_update[2].to(torch.int32)
        inputs = step.inputs
        if bucket is not None:
            inputs = self._inputs[:, :bucket]
            inputs.copy_(step.inputs)
        if step.prev_src.numel():  # the previous step's tokens, still on the device; a failed one (-1) is fed as 0
            inputs[0].index_copy_(0, step.prev_dst, self._prev_ids.index_select(0, step.prev_src).clamp(min=0))
        if sched.prefills:
            logits = self._pass(*inputs, num_decodes, self._prefill_chunks(step.prefills), step.wanted,
                                lora=any(c.request.lora_slot is not None for c in sched.chunks))
        else:
            plain = self.lora is not None and all(c.request.lora_slot is None for c in sched.decodes)
            graphs = self._base_graphs if plain else self.graphs
            if bucket in (graphs or {}):
                graph, out = graphs[bucket]
                graph.replay()
            else:
                out = self._decode_fn(*inputs, not plain)
            logits = out[:num_decodes] if step.all_decodes_sample else out[step.wanted]
        return self._sample(sched.sampled, logits, guide() if guide is not None else None)

    def _stage(self, sched: SchedulerOutput, bucket: int | None) -> _Staged:
        """Every per-token number of the step, built on the host and copied to the device at once."""
        num_decodes = len(sched.decodes)
        ids, positions, rows, prev_dst, prev_src, wanted = [], [], [], [], [], []
        table_rows, table_cols, table_blocks = [], [], []
        prefills = []
        t = 0
        for i, c in enumerate(sched.chunks):
            req = c.request
            self._sync_blocks(req, table_rows, table_cols, table_blocks)
            if c.from_previous:
                if c.num_tokens != 1 or req not in self._prev_index:
                    raise RuntimeError(f"request {req.request_id}: a from_previous decode needs a token sampled "
                                       "in the previous step")
                prev_dst.append(t)
                prev_src.append(self._prev_index[req])
                ids.append(0)
            elif len(c.token_ids) != c.num_tokens:
                raise ValueError(f"request {req.request_id}: chunk of {c.num_tokens} tokens has {len(c.token_ids)} ids")
            else:
                ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            rows.extend([req.row] * c.num_tokens)
            if c.sample:
                wanted.append(t + c.num_tokens - 1)
            if i >= num_decodes:
                prefills.append((t, c.start, c.end, req.row))
            t += c.num_tokens
        pad = (bucket or t) - t  # padding entries: token 0 at position 0 of the scratch row
        ids += [0] * pad
        positions += [0] * pad
        rows += [self.scratch_row] * pad
        parts = [ids + positions + rows, prev_dst, prev_src, table_rows + table_cols + table_blocks, wanted]
        packed = to_device([x for part in parts for x in part], torch.long, self.device)
        inputs, prev_dst_d, prev_src_d, table_update, wanted_d = packed.split([len(part) for part in parts])
        return _Staged(inputs.view(3, -1), prev_dst_d, prev_src_d, table_update.view(3, -1), wanted_d,
                       wanted == list(range(num_decodes)), prefills)

    # ------------------------------------------------------------------ rows

    def _update_rows(self, sched: SchedulerOutput) -> None:
        for row in sched.freed_rows:
            self._synced[row] = 0
            self._generators.pop(row, None)
        for row in sched.reset_rows:
            self._synced[row] = 0
        for slot, adapter in sched.lora_loads:
            self.lora.load(slot, adapter)
        if not sched.new_rows:
            return
        rows, rope_rows, mscales, lora_slots = [], [], [], []
        for req in sched.new_rows:
            rope = req.rope or self.model.rope_params(len(req.prompt_ids))
            rows.append(req.row)
            rope_rows.append(self.rope.row(rope.base))
            mscales.append(rope.mscale)
            lora_slots.append(-1 if req.lora_slot is None else req.lora_slot)
            self._synced[req.row] = 0
            if req.params.seed is not None:
                self._generators[req.row] = torch.Generator(device=self.device).manual_seed(req.params.seed)
            else:
                self._generators.pop(req.row, None)
            if req.params.repetition_penalty != 1.0:
                self.presence[req.row] = False
                seen = to_device(req.known_ids(0, req.num_known_tokens), torch.long, self.device)
                self.presence[req.row, seen] = True
            if req.params.frequency_penalty or req.params.presence_penalty:
                if self.output_counts is None:
                    self.output_counts = torch.zeros(self.num_rows, self.vocab_size, dtype=torch.int32,
                                                     device=self.device)
                self.output_counts[req.row] = 0
                if req.output_ids:
                    out = to_device(req.output_ids, torch.long, self.device)
                    self.output_counts[req.row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        idx = to_device(rows, torch.long, self.device)
        self.row_rope[idx] = to_device(rope_rows, torch.long, self.device)
        self.row_mscale[idx] = to_device(mscales, torch.float32, self.device)
        self.row_lora[idx] = to_device(lora_slots, torch.long, self.device)

    def _sync_blocks(self, req: Request, rows: list[int], cols: list[int], blocks: list[int]) -> None:
        """Stage the blocks of ``req``'s table that the device does not have yet (tables only grow
        between ``reset_rows``)."""
        done, ids = self._synced[req.row], req.block_ids
        if len(ids) > self.max_blocks:
            raise ValueError(f"request {req.request_id} holds {len(ids)} blocks; the runner's tables hold "
                             f"{self.max_blocks} (max_model_len)")
        if done < len(ids):
            rows.extend([req.row] * (len(ids) - done))
            cols.extend(range(done, len(ids)))
            blocks.extend(ids[done:])
            self._synced[req.row] = len(ids)

    # ------------------------------------------------------------------ forward

    def _prefill_chunks(self, prefills: list[tuple[int, int, int, int]]) -> list[PrefillChunk]:
        bs = self.block_size
        chunks = []
        for first, start, end, row in prefills:
            ctx = None
            if start > 0:  # context from the cache: slots of positions [0, end) through the row's table
                blocks = self.tables[row, : math.ceil(end / bs)].long()
                ctx = (blocks.unsqueeze(1) * bs + self._block_offsets).flatten()[:end]
            chunks.append(PrefillChunk(row=first, start=start, end=end, context_slots=ctx))
        return chunks

    def _pass(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, num_decodes: int,
              prefills: list[PrefillChunk], logits_rows: torch.Tensor | None, lora: bool = True) -> torch.Tensor:
        """Logits of one flat batch: tokens ``ids`` at ``positions`` of the sequences in ``rows``; ``lora``
        False skips the LoRA path (no row of the batch has an adapter: same result, less work)."""
        bs = self.block_size
        slots = self.tables[rows, positions // bs].long() * bs + positions % bs
        decoding = rows[:num_decodes]
        attention = StepAttention(
            cache=self.cache, write_slots=slots, decode_rows=num_decodes,
            block_tables=self.tables[decoding] if num_decodes else None,
            seq_lens=(positions[:num_decodes] + 1).to(torch.int32) if num_decodes else None,
            prefills=prefills,
        )
        batch = ForwardBatch(positions=positions, inv_freq=self.rope.table[self.row_rope[rows]],
                             mscale=self.row_mscale[rows], attention=attention, logits_rows=logits_rows,
                             lora=self.lora.batch(self.row_lora[rows]) if self.lora is not None and lora else None)
        return self.model.forward_batch(ids, batch)

    def _decode_pass(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                     lora: bool = True) -> torch.Tensor:
        return self._pass(ids, positions, rows, ids.shape[0], [], None, lora=lora)

    def _decode_body(self, b: int, lora: bool = True) -> torch.Tensor:
        return self._decode_fn(*self._inputs[:, :b], lora)

    # ------------------------------------------------------------------ sampling

    def _sample(self, sampled: list, logits: torch.Tensor, bitmask: torch.Tensor | None = None) -> StepResult:
        """Sample the step's ``sampled`` chunks from ``logits`` (one row each; ``bitmask``: the tokens each
        may take, structured output), update the presence masks, start the copy to the host."""
        dev = self.device
        if not sampled:
            self._prev_ids, self._prev_index = self._prev_ids[:0], {}
            return StepResult(torch.empty(0, dtype=torch.long), logits=logits)
        params = [c.request.params for c in sampled]
        state_rows = [c.request.row for c in sampled]
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        counted = self.output_counts is not None and any(p.frequency_penalty or p.presence_penalty for p in params)
        rows = to_device(state_rows, torch.long, dev) if penalised or counted else None
        raw = logits
        if any(needs_adjusting(p) for p in params):
            # outputs before the token sampled now (placeholders count: they are outputs the host has not read)
            generated = [len(c.request.output_ids) + c.request.num_placeholders - 1 for c in sampled]
            logits = adjust_logits(logits, params, generated, self.output_counts[rows] if counted else None)
        tokens, failed = sample_on_device(logits, params, [self._generators.get(r) for r in state_rows],
                                          self.presence[rows] if penalised else None, self.generator,
                                          allowed_tokens(to_device(bitmask, torch.int32, dev), self.vocab_size)
                                          if bitmask is not None else None)
        if penalised:
            self.presence[rows, tokens] = self.presence[rows, tokens] | ~failed
        if counted:
            self.output_counts[rows, tokens] += (~failed).int()
        ids = torch.where(failed, FAILED, tokens)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        host_lp = host_top = None
        if logprob_rows:
            idx = to_device(logprob_rows, torch.long, dev)
            lp, top = top_logprobs(raw[idx], tokens[idx], max(params[i].logprobs for i in logprob_rows))
            host_lp = torch.empty(lp.shape, dtype=lp.dtype, pin_memory=dev.type == "cuda")
            host_top = torch.empty(top.shape, dtype=top.dtype, pin_memory=dev.type == "cuda")
            host_lp.copy_(lp, non_blocking=True)
            host_top.copy_(top, non_blocking=True)
        self._prev_ids = ids
        self._prev_index = {c.request: i for i, c in enumerate(sampled)}
        host = torch.empty(len(sampled), dtype=torch.long, pin_memory=dev.type == "cuda")
        host.copy_(ids, non_blocking=True)
        ready = None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return StepResult(host, ready, raw, logprob_rows or None, host_lp, host_top)
