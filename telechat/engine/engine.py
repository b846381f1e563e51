"""Continuous-batching engine over token ids.

Contract of :meth:`LLMEngine.step` (one step = one forward pass):

1. Aborted requests leave, their KV blocks are freed.
2. Every running sequence with one pending token decodes it. If the cache has no room for a
   decode, the most recently admitted sequence is preempted (its blocks freed, it goes back to the
   front of the queue and later recomputes prompt + output; its RoPE and random generator are
   kept, so its text does not change).
3. Prefill chunks fill the rest of the step's token budget: first sequences already prefilling,
   then new requests in arrival order, while ``max_num_seqs`` and free blocks allow.
4. Sequences whose context is complete sample one token; finished ones leave at once.

The engine knows nothing about text: prompts and outputs are token ids.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from telechat.engine.kv_cache import BlockAllocator, PagedKVCache
from telechat.engine.runner import ModelRunner, StepInput
from telechat.engine.sampling import SamplingParams, sample
from telechat.model.rope import RopeParams

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Capacity settings, fixed at start."""

    max_num_seqs: int = 32
    """Most sequences decoding together."""
    max_model_len: int | None = None
    """Longest prompt + output per sequence (default: the checkpoint's seq_length)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decodes plus prefill chunks (long prompts are split)."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache; default: GPU memory × gpu_memory_utilization minus what is used,
    or on CPU min(4 GiB, 20% of RAM)."""
    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory the process may use (weights + KV cache + activations)."""
    seed: int = 0
    """Seed of the generator shared by requests that bring no seed."""
    cuda_graphs: bool | None = None
    """Capture decode passes in CUDA graphs (default: on for CUDA devices)."""
    compile: bool = False
    """torch.compile the decode pass before capture (slow start, see bench/RESULTS.md)."""


@dataclass
class RequestOutput:
    """New tokens of one request after a step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    rope: RopeParams | None = None
    generator: torch.Generator | None = None
    aborted: bool = False
    abort_error: str | None = None  # why it was aborted, when it is the server's doing (shutdown)
    row: int | None = None  # sampling-state row (presence mask), held from first admission to finish

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class LLMEngine:
    """Synchronous continuous-batching engine; drive it with :meth:`add_request` and :meth:`step`."""

    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model
        self.config = config = config or EngineConfig()
        mc = model.config
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.max_model_len = config.max_model_len or mc.seq_length
        per_token = PagedKVCache.bytes_per_token(mc.n_layer, mc.num_key_value_heads, mc.head_dim, dtype)
        budget = config.kv_cache_memory or self._default_kv_budget(mc, dtype)
        wanted = math.ceil(config.max_num_seqs * self.max_model_len / config.block_size)
        num_blocks = min(budget // (per_token * config.block_size), wanted)
        if num_blocks < 2:
            raise MemoryError(f"KV cache budget of {budget / 2**20:.1f} MiB holds fewer than 2 blocks of "
                              f"{config.block_size} tokens; lower the model size or raise the memory budget")
        # One extra block: scratch space that padded rows of a captured decode batch write into.
        self.cache = PagedKVCache(num_layers=mc.n_layer, num_blocks=num_blocks + 1, block_size=config.block_size,
                                  n_kv=mc.num_key_value_heads, head_dim=mc.head_dim, dtype=dtype, device=self.device)
        self.allocator = BlockAllocator(num_blocks + 1, reserved=1)
        self.capacity_tokens = num_blocks * config.block_size
        if self.capacity_tokens < self.max_model_len:
            log.warning("max_model_len %d exceeds the KV capacity; lowering it to %d",
                        self.max_model_len, self.capacity_tokens)
            self.max_model_len = self.capacity_tokens
        self.runner = ModelRunner(model, self.cache, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len, max_rows=2 * config.max_num_seqs,
                                  cuda_graphs=config.cuda_graphs, compile=config.compile)
        self.runner.capture_graphs()
        self.presence: torch.Tensor | None = None  # [rows, vocab] tokens seen, for repetition penalties
        # Rows for running sequences plus as many preempted ones waiting to resume.
        self._free_rows = list(range(config.max_num_seqs * 2 - 1, -1, -1))
        self.rotary = model.transformer.rotary
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.requests: dict[str, Sequence] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.tokens_generated = 0
        self.num_preemptions = 0
        self._ids = itertools.count()
        log.info("KV cache: %d blocks × %d tokens = %d tokens capacity (%.1f MiB)", num_blocks,
                 config.block_size, self.capacity_tokens, num_blocks * config.block_size * per_token / 2**20)

    def _default_kv_budget(self, mc, dtype) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            elem = torch.tensor([], dtype=dtype).element_size()
            t = self.config.max_num_batched_tokens
            # Activations of one step: MLP/attention intermediates plus float32 logits per sequence.
            activations = t * (3 * mc.ffn_hidden_size + 6 * mc.hidden_size) * elem + \
                max(self.config.max_num_seqs, 256) * mc.vocab_size * 4 * 2
            return int(total * self.config.gpu_memory_utilization - used - activations)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 << 30
        return int(min(4 << 30, 0.2 * ram))

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises ``ValueError`` if it can never fit the context or the cache."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                             f"{self.max_model_len} tokens including the reply")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, list(prompt_ids), params,
                       max_len=min(self.max_model_len, len(prompt_ids) + params.max_tokens))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.requests[rid] = seq
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Mark a request aborted; it leaves at the start of the next step with finish reason
        ``abort`` and ``error`` (None when the client itself gave up)."""
        seq = self.requests.get(request_id)
        if seq is not None:
            seq.aborted = True
            seq.abort_error = error

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.requests)

    def stats(self) -> dict:
        """Queue and cache figures for metrics and health."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_capacity_tokens": self.capacity_tokens,
            "kv_usage": 1.0 - self.allocator.free / self.allocator.num_blocks,
            "tokens_generated": self.tokens_generated,
            "preemptions": self.num_preemptions,
            "max_model_len": self.max_model_len,
        }

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Run one scheduling round and forward pass; return the outputs it produced."""
        with record_function("engine.schedule"):
            outputs = self._drop_aborted()
            decodes = self._schedule_decodes()
            budget = self.config.max_num_batched_tokens - len(decodes)
            prefills = self._schedule_prefills(budget, reserve=len(decodes))
            if not decodes and not prefills:
                return outputs
            inputs = [self._step_input(s, 1) for s in decodes] + [self._step_input(s, n) for s, n in prefills]
        try:
            with record_function("engine.forward"):
                logits = self.runner.forward(inputs[: len(decodes)], inputs[len(decodes):])
        except Exception as e:  # noqa: BLE001 - a failed forward fails its sequences, not the engine
            log.exception("forward pass failed")
            for seq in decodes + [s for s, _ in prefills]:
                outputs.append(self._finish(seq, "error", error=f"generation failed: {e}"))
            return outputs
        for seq, n in [(s, 1) for s in decodes] + prefills:
            seq.num_computed += n
        ready = [(i, s) for i, s in enumerate(decodes + [s for s, _ in prefills]) if s.num_computed == s.num_tokens]
        if ready:
            with record_function("engine.sample"):
                outputs.extend(self._sample([i for i, _ in ready], [s for _, s in ready], logits))
        return outputs

    def _drop_aborted(self) -> list[RequestOutput]:
        gone = [s for s in self.requests.values() if s.aborted]
        return [self._finish(s, "abort", error=s.abort_error) for s in gone]

    def _schedule_decodes(self) -> list[Sequence]:
        decodes = [s for s in self.running if s.num_computed == s.num_tokens - 1 and s.num_computed > 0]
        for seq in list(decodes):
            if seq not in self.running:  # preempted below for an earlier sequence
                continue
            while not self._reserve(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
        running = set(self.running)
        return [s for s in decodes if s in running]

    def _schedule_prefills(self, budget: int, reserve: int) -> list[tuple[Sequence, int]]:
        chosen: list[tuple[Sequence, int]] = []
        candidates = [s for s in self.running if s.num_computed < s.num_tokens - 1 or s.num_computed == 0]
        for seq in candidates + list(self.waiting):
            if budget <= 0:
                break
            admitted = seq in self.running
            if not admitted and (len(self.running) >= self.config.max_num_seqs
                                 or (seq.row is None and not self._free_rows)):
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            # Keep one free block per decoding sequence so decodes rarely need preemption.
            if not self._reserve(seq, seq.num_computed + n, keep_free=0 if admitted else reserve):
                break
            if not admitted:
                self.waiting.remove(seq)
                self.running.append(seq)
                if seq.rope is None:  # RoPE and sampling state fixed once, at first admission
                    seq.rope = self.rotary.params(len(seq.prompt_ids))
                    self._init_row(seq)
            chosen.append((seq, n))
            budget -= n
        return chosen

    def _reserve(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        need = math.ceil(num_tokens / self.cache.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need + keep_free > self.allocator.free:
            return False
        seq.blocks.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.blocks)
        self.runner.forget_row(seq.row)
        seq.blocks, seq.num_computed = [], 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.info("preempted %s (KV cache full); it will be recomputed", seq.request_id)

    def _step_input(self, seq: Sequence, n: int) -> StepInput:
        start, end, plen = seq.num_computed, seq.num_computed + n, len(seq.prompt_ids)
        if end <= plen:
            tokens = seq.prompt_ids[start:end]
        elif start >= plen:
            tokens = seq.output_ids[start - plen : end - plen]
        else:
            tokens = seq.prompt_ids[start:] + seq.output_ids[: end - plen]
        return StepInput(tokens=tokens, start=start, blocks=seq.blocks, rope=seq.rope, row=seq.row)

    def _init_row(self, seq: Sequence) -> None:
        seq.row = self._free_rows.pop()
        if seq.params.repetition_penalty == 1.0:
            return
        if self.presence is None:  # allocated on the first request that uses a penalty
            self.presence = torch.zeros(2 * self.config.max_num_seqs, self.model.config.vocab_size,
                                        dtype=torch.bool, device=self.device)
        self.presence[seq.row] = False
        self.presence[seq.row, torch.tensor(seq.all_ids, device=self.device)] = True

    def _sample(self, rows: list[int], seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample the ready rows; a request whose sampling fails ends alone, with an error."""
        try:
            tokens = self._draw(rows, seqs, logits)
        except Exception:  # noqa: BLE001 - find the failing request: draw each row on its own
            log.exception("batched sampling failed; sampling the %d requests one by one", len(seqs))
            tokens = []
            for row, seq in zip(rows, seqs):
                try:
                    tokens.extend(self._draw([row], [seq], logits))
                except Exception as e:  # noqa: BLE001
                    tokens.append(e)
        outputs = []
        for seq, tok in zip(seqs, tokens):
            if not isinstance(tok, int):
                why = f"sampling failed: {tok}" if isinstance(tok, Exception) else \
                    "sampling failed: the next-token probabilities are not finite (NaN or infinite)"
                log.warning("%s: %s", seq.request_id, why)
                outputs.append(self._finish(seq, "error", error=why))
                continue
            seq.output_ids.append(tok)
            self.tokens_generated += 1
            p = seq.params
            reason = None
            if not p.ignore_eos and tok in p.stop_token_ids:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
                reason = "length"
            if reason:
                outputs.append(self._finish(seq, reason, new=[tok]))
            else:
                outputs.append(RequestOutput(seq.request_id, [tok], num_prompt_tokens=len(seq.prompt_ids),
                                             num_output_tokens=len(seq.output_ids)))
        return outputs

    def _draw(self, rows: list[int], seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """One token per sequence (None where its numbers went bad), presence masks updated."""
        penalised = self.presence is not None and any(s.params.repetition_penalty != 1.0 for s in seqs)
        state_rows = torch.tensor([s.row for s in seqs], device=self.device) if penalised else None
        presence = self.presence[state_rows] if penalised else None
        gens = [s.generator for s in seqs]
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        tokens = sample(picked, [s.params for s in seqs], gens, presence, self.generator)
        if penalised:
            good = [(s.row, t) for s, t in zip(seqs, tokens) if t is not None]
            if good:
                at = torch.tensor(good, device=self.device)
                self.presence[at[:, 0], at[:, 1]] = True
        return tokens

    def _finish(self, seq: Sequence, reason: str, new: list[int] | None = None, error: str | None = None
                ) -> RequestOutput:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.blocks)
        seq.blocks = []
        if seq.row is not None:
            self.runner.forget_row(seq.row)
            self._free_rows.append(seq.row)
            seq.row = None
        self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, new or [], finished=True, finish_reason=reason,
                             num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
                             error=error)

    # ------------------------------------------------------------------ convenience

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; return each one's output ids (stop token dropped)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, str] = {}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
                    if out.error:
                        raise RuntimeError(out.error)
        final = []
        for i, sp in zip(ids, plist):
            toks = results[i]
            if reasons[i] == "stop" and toks and toks[-1] in sp.stop_token_ids:
                toks = toks[:-1]
            final.append(toks)
        return final
