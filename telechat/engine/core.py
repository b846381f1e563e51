"""The engine core: scheduler + model runner + paged KV cache, stepped one forward pass at a time.

Contract of :meth:`LLMEngine.step` (docs/engine.md, "One step"): the scheduler decides what every
request computes in this step (:class:`~telechat.engine.scheduler_output.SchedulerOutput`), the
runner launches the forward pass and the sampling on the device, and the scheduler turns the
sampled tokens into :class:`~telechat.engine.request.RequestOutput`\\ s.

With ``overlap`` (the default on CUDA) the step's tokens are read one step later: step N+1 is
scheduled and launched before step N's tokens are copied back, so host work (scheduling, input
preparation, IPC, detokenizing in the API process) runs while the GPU computes. The scheduler
tracks the unread tokens as placeholders; outputs are the same as without overlap.

The engine knows nothing about text: prompts and outputs are token ids.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from telechat.engine.guided import GRAMMAR_TIMEOUT_S, GrammarCompiler, GrammarError, GuidedRequests
from telechat.engine.kv_cache import PagedKVCache, check_kv_cache_device, kv_cache_torch_dtype
from telechat.engine.request import Request, RequestOutput
from telechat.engine.runner import ModelRunner, StepResult
from telechat.engine.sampling import SamplingParams
from telechat.engine.scheduler import Scheduler, SchedulerConfig
from telechat.engine.scheduler_output import SchedulerOutput
from telechat.model.lora import AdapterError, LoraAdapter, read_adapter

log = logging.getLogger(__name__)

GRAMMAR_POLL_S = 0.005
"""How long an idle step waits for a compiling grammar before the loop looks at its inbox again."""
GRAMMAR_VIOLATION = "structured output failed: a token outside the grammar was sampled"


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
    enable_prefix_caching: bool = True
    """Reuse the KV of prompt prefixes seen before (hash-chained full blocks, LRU eviction)."""
    overlap: bool | None = None
    """Schedule step N+1 while step N runs on the device (default: on for CUDA devices)."""
    max_loras: int = 0
    """LoRA adapter slots on the device for adapters chosen per request (0: off); more adapters may be
    loaded, they wait on the host until a request needs one (docs/engine.md, Batched LoRA)."""
    max_lora_rank: int = 64
    """Largest adapter rank the slots hold."""
    kv_cache_dtype: str = "auto"
    """``auto`` (the model's dtype) or ``fp8`` (E4M3, half the bytes per token; docs/engine.md)."""
    warm_up: bool | None = None
    """Run dummy prefills and decodes at start (:meth:`LLMEngine.warm_up`; default: on for CUDA devices)."""
    grammar_timeout_s: float = GRAMMAR_TIMEOUT_S
    """Most seconds a structured-output grammar may compile before its request is refused."""


class LLMEngine:
    """Synchronous continuous-batching engine; drive it with :meth:`add_request` and :meth:`step`."""

    def __init__(self, model, config: EngineConfig | None = None, grammars: GrammarCompiler | None = None):
        """``grammars``: compiles the grammars of structured-output requests (None: such requests are refused)."""
        self.config = config = config or EngineConfig()
        model.fuse_projections()
        self.model = model
        mc = model.config
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.vocab_size = mc.vocab_size
        self.max_model_len = config.max_model_len or mc.seq_length
        kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)
        check_kv_cache_device(kv_dtype, self.device)
        per_token = PagedKVCache.bytes_per_token(mc.n_layer, mc.num_key_value_heads, mc.head_dim, kv_dtype)
        budget = config.kv_cache_memory or self._default_kv_budget(mc, dtype)
        wanted = math.ceil(config.max_num_seqs * self.max_model_len / config.block_size)
        num_blocks = min(budget // (per_token * config.block_size), wanted)
        if num_blocks < 2:
            raise MemoryError(f"KV cache budget of {budget / 2**20:.1f} MiB holds fewer than 2 blocks of "
                              f"{config.block_size} tokens; lower the model size or raise the memory budget")
        self.capacity_tokens = num_blocks * config.block_size
        if self.capacity_tokens < self.max_model_len:
            log.warning("max_model_len %d exceeds the KV capacity; lowering it to %d",
                        self.max_model_len, self.capacity_tokens)
            self.max_model_len = self.capacity_tokens
        # One extra block: scratch space that padded rows of a captured decode batch write into.
        cache = PagedKVCache(num_layers=mc.n_layer, num_blocks=num_blocks + 1, block_size=config.block_size,
                             n_kv=mc.num_key_value_heads, head_dim=mc.head_dim, dtype=kv_dtype, device=self.device)
        num_rows = 2 * config.max_num_seqs  # running sequences plus as many preempted ones waiting to resume
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=num_blocks + 1, max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching, num_rows=num_rows, max_loras=config.max_loras))
        self.runner = ModelRunner(model, cache, max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  num_rows=num_rows, seed=config.seed, cuda_graphs=config.cuda_graphs,
                                  compile=config.compile, max_loras=config.max_loras,
                                  max_lora_rank=config.max_lora_rank)
        self.adapters: dict[str, LoraAdapter] = {}
        """LoRA adapters requests may name, on the host (copied into a device slot when a request needs one)."""
        self._adapter_ids = itertools.count(1)
        self.runner.capture_graphs()
        self.overlap = self.device.type == "cuda" if config.overlap is None else config.overlap
        self._in_flight: tuple[SchedulerOutput, StepResult] | None = None
        self._ids = itertools.count()
        self.guided = GuidedRequests(grammars, config.grammar_timeout_s)
        self._refused: dict[str, str] = {}
        if self.device.type == "cuda" if config.warm_up is None else config.warm_up:
            self.warm_up()
        log.info("KV cache (%s): %d blocks × %d tokens = %d tokens capacity (%.1f MiB); prefix caching %s",
                 "fp8 e4m3" if cache.is_fp8 else str(kv_dtype).removeprefix("torch."), num_blocks, config.block_size,
                 self.capacity_tokens, num_blocks * config.block_size * per_token / 2**20,
                 "on" if config.enable_prefix_caching else "off")

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

    @property
    def requests(self) -> dict[str, Request]:
        """Requests waiting or running, by id."""
        return self.scheduler.requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    after: str | None = None, lora: str | None = None) -> str:
        """Queue a request; raises ``ValueError`` if it can never fit the context or the cache.
        ``after``: a sibling with the same prompt whose first token it waits for (``Request.after``);
        ``lora``: the name of a loaded LoRA adapter to run it with (None: the base model)."""
        adapter = None
        if lora is not None:
            adapter = self.adapters.get(lora)
            if adapter is None:
                raise ValueError(f"no LoRA adapter named {lora!r} is loaded")
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                             f"{self.max_model_len} tokens including the reply")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        # A grammar compiled before starts its matcher now; a new one compiles off the loop while the request
        # waits (refused later, see take_refused, if it cannot be compiled). GrammarError: no compiler at all.
        ready = params.guided is None or self.guided.add(rid, params.guided, params.stop_token_ids)
        rope = self.model.rope_params(len(prompt_ids))
        self.scheduler.add_request(Request(
            rid, list(prompt_ids), params, max_len=min(self.max_model_len, len(prompt_ids) + params.max_tokens),
            rope=rope, cache_salt=(rope.base, rope.mscale) + ((adapter.id,) if adapter else ()), after=after,
            lora=adapter, waiting_for_grammar=not ready))
        return rid

    def take_refused(self) -> dict[str, str]:
        """Requests refused since the last call, after :meth:`add_request` accepted them (their grammar could
        not be compiled in time, or at all), with why; they left with no output."""
        refused, self._refused = self._refused, {}
        return refused

    def load_adapter(self, name: str, path: str) -> LoraAdapter:
        """Read the PEFT LoRA adapter at ``path`` for requests that name ``name``; raises
        :class:`~telechat.model.lora.AdapterError` (a ``ValueError``) for a name in use or a folder that
        cannot be served (see :func:`~telechat.model.lora.read_adapter`)."""
        if self.runner.lora is None:
            raise AdapterError("this engine serves no per-request LoRA adapters (max_loras is 0)")
        if name in self.adapters:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded; unload it first or pick another name")
        adapter = read_adapter(path, name, self.model, self.runner.lora.max_rank, dtype=self.model.dtype)
        adapter.id = next(self._adapter_ids)
        if self.device.type == "cuda":  # pinned: the copy into a slot does not wait for the host
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        self.adapters[name] = adapter
        log.info("LoRA adapter %r loaded from %s (rank %d)", name, adapter.path, adapter.rank)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Forget the adapter ``name``: new requests cannot name it; the ones already queued finish with
        it. Raises ``KeyError`` for a name that is not loaded."""
        if self.adapters.pop(name, None) is None:
            raise KeyError(f"no LoRA adapter named {name!r} is loaded")
        log.info("LoRA adapter %r unloaded", name)

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Mark a request aborted; it leaves at the start of the next step with finish reason
        ``abort`` and ``error`` (None when the client itself gave up)."""
        self.scheduler.abort(request_id, error)

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running, or a step's tokens are still unread."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def stats(self) -> dict:
        """Queue, cache and prefix-cache figures for metrics and health."""
        return {**self.scheduler.stats(), "kv_capacity_tokens": self.capacity_tokens,
                "max_model_len": self.max_model_len}

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with finish reason ``error`` (the engine itself failed)."""
        self._in_flight = None
        self.guided.clear()
        return self.scheduler.fail_all(error)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one forward pass; return the outputs of the step whose tokens are now read
        (this one, or with overlap the previous one)."""
        if self.guided.compiling:
            self._poll_grammars()
        with record_function("engine.schedule"):
            sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        guide = None
        if self.guided and any(self.guided.constrained(c.request.request_id) for c in sched.sampled):
            def guide() -> torch.Tensor | None:
                # A constrained row's mask needs its every token read: the previous step's tokens are read
                # here, while the device runs this step's forward pass (docs/engine.md, "Constrained decoding").
                nonlocal previous
                if previous is not None:
                    outputs.extend(self._update(*previous))
                    previous = None
                return self.guided.bitmask([c.request.request_id for c in sched.sampled], self.vocab_size)
        launched = None
        if sched.empty:
            outputs.extend(sched.finished)  # aborts; a launched step reports them with its tokens
            if previous is None and self.guided.compiling:  # nothing runs: wait for a grammar, do not spin
                self.guided.wait(GRAMMAR_POLL_S)
        else:
            try:
                with record_function("engine.execute"):
                    launched = (sched, self.runner.execute(sched, guide))
            except Exception as e:  # noqa: BLE001 - a failed forward fails its sequences, not the engine
                log.exception("forward pass failed")
                outputs.extend(sched.finished)
                outputs.extend(self.scheduler.fail([c.request for c in sched.chunks], f"generation failed: {e}"))
        self._in_flight = launched if self.overlap else None
        if previous is not None:
            outputs.extend(self._update(*previous))
        if launched is not None and not self.overlap:
            outputs.extend(self._update(*launched))
        if self.guided or self.guided.compiling:
            for out in outputs:
                if out.finished:
                    self.guided.remove(out.request_id)
        return outputs

    def _poll_grammars(self) -> None:
        """Admit the requests whose grammar compiled; refuse those whose grammar failed or timed out."""
        ready, refused = self.guided.poll()
        for request_id in ready:
            if request_id in self.scheduler.requests:  # (an abort may have ended it since)
                self.scheduler.requests[request_id].waiting_for_grammar = False
        for request_id, why in refused.items():
            if request_id in self.scheduler.requests:
                self.scheduler.refuse(request_id)
                self._refused[request_id] = why
                log.info("%s refused: %s", request_id, why)

    def _update(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        try:
            with record_function("engine.read_tokens"):
                tokens = result.tokens()
                logprobs = result.logprobs([c.request.params.logprobs for c in sched.sampled])
        except Exception as e:  # noqa: BLE001 - e.g. a device fault surfacing at the copy
            log.exception("reading a step's tokens failed")
            return sched.finished + self.scheduler.fail([c.request for c in sched.sampled], f"generation failed: {e}")
        with record_function("engine.update"):
            outputs = self.scheduler.update_from_output(sched, tokens, logprobs)
        if self.guided:
            self._advance_grammars(outputs)
        return outputs

    def _advance_grammars(self, outputs: list[RequestOutput]) -> None:
        """Feed the tokens just read to their requests' grammar matchers; a token the grammar refuses
        (which the mask should make impossible) ends that request alone."""
        for out in outputs:
            if out.finished:
                self.guided.remove(out.request_id)
            elif not self.guided.accept(out.request_id, out.new_token_ids):
                log.error("%s: sampled a token its grammar does not allow", out.request_id)
                self.guided.remove(out.request_id)
                self.scheduler.abort(out.request_id, GRAMMAR_VIOLATION)

    def warm_up(self) -> None:
        """Run the shapes a server meets first with dummy tokens — a prefill of the whole step budget, a short
        prompt, its continuation over the cached prompt (a chat turn), their first decode steps — then forget
        them (prefix cache and figures as after start).

        On CUDA a shape's first use loads its GEMM kernels and compiles Triton variants: measured on an
        H200, the first 128-token request after start took 75 ms to its first token, the next ones 18 ms,
        and the first chat turn over a cached history 0.7-0.9 s (bench/RESULTS.md). vLLM runs a dummy batch
        at start for the same reason (and to fail early when activations do not fit)."""
        budget = self.config.max_num_batched_tokens
        longest = max(1, min(self.max_model_len - 2, budget))
        prompts = [[1 + (7 * i + j) % (self.vocab_size - 1) for j in range(min(longest, budget - i * longest))]
                   for i in range(min(self.config.max_num_seqs, -(-budget // longest)))]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.generate(prompts, params)
        short = [1 + (11 * j) % (self.vocab_size - 1) for j in range(min(longest, 128))]
        self.generate([short], params)
        more = min(16, self.max_model_len - 2 - len(short))
        if more > 0:  # the next chat turn: a chunk over the cached prompt (the prefix-prefill kernel on CUDA)
            self.generate([short + [1 + (13 * j) % (self.vocab_size - 1) for j in range(more)]], params)
        self.scheduler.reset()

    # ------------------------------------------------------------------ convenience

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; return each one's output ids (stop token dropped)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, str] = {}
        refused: dict[str, str] = {}
        while self.has_unfinished():
            outputs = self.step()
            refused.update(self.take_refused())
            for out in outputs:
                results[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
                    if out.error:
                        raise RuntimeError(out.error)
        if refused:
            raise GrammarError(next(iter(refused.values())))
        final = []
        for i, sp in zip(ids, plist):
            toks = results[i]
            if reasons[i] == "stop" and toks and toks[-1] in sp.stop_token_ids:
                toks = toks[:-1]
            final.append(toks)
        return final
