"""A served model: weights + tokenizer + chat format + generation defaults + running engine.

One place that the API, the CLI and the benchmarks use to go from a folder to something that
answers chat messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from telechat.chat_format import ContentMarkers
from telechat.model.checkpoint import CheckpointInfo
from telechat.engine.async_engine import EngineFront
from telechat.engine.core import EngineConfig
from telechat.engine.sampling import SamplingParams
from telechat.engine.text import TextStream

if TYPE_CHECKING:
    from telechat.engine.core_process import CoreAddress, EngineSpec

log = logging.getLogger(__name__)


@dataclass
class GenerationDefaults:
    """Sampling defaults from the checkpoint's ``generation_config.json`` (do_sample false → greedy)."""

    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_config(cls, raw: dict | None) -> GenerationDefaults:
        """The defaults of a ``generation_config.json`` (None: the official values)."""
        raw = raw or {}
        return cls(**{k: raw[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample")
                      if k in raw})


@dataclass
class StreamDelta:
    """A piece of a reply: new text, and the final state when ``finish_reason`` is set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    logprobs: list[tuple[int, float, list[int], list[float]]] | None = None
    """With ``SamplingParams.logprobs``: per token behind this text (stop tokens left out), its id,
    log-probability, and the ids and log-probabilities of the most likely alternatives."""
    queue_s: float | None = None
    """On the first delta after the engine read back the first token: its time queued in the engine."""
    prefill_s: float | None = None
    """On that delta: its time from the first scheduling to the first token (``RequestOutput.prefill_s``)."""


def engine_spec(info: CheckpointInfo, *, device: str = "auto", dtype: str = "auto",
                engine_config: EngineConfig | None = None, lora: str | Path | None = None,
                lora_modules: dict[str, str] | None = None, **config_overrides) -> EngineSpec:
    """What an engine core needs to load ``info``'s checkpoint (with ``lora`` merged in, ``lora_modules``
    chosen per request) and build its engine; raises :class:`~telechat.errors.UserError` for a bad adapter."""
    from telechat.engine.core_process import EngineSpec

    if lora:
        lora = check_adapter(lora)
    return EngineSpec(str(Path(info.path).expanduser().resolve()), device=device, dtype=dtype,
                      engine_config=engine_config, lora=str(lora) if lora else None,
                      lora_modules=dict(lora_modules or {}), config_overrides=config_overrides,
                      log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))


@dataclass
class Runtime:
    """Everything needed to answer requests for one model. The model itself lives with the engine
    (in the engine core process when the API serves), never here."""

    name: str
    path: Path
    tokenizer: object
    chat: object
    engine: EngineFront
    defaults: GenerationDefaults
    is_demo: bool = False
    aliases: list[str] = field(default_factory=list)
    """Other names requests may give the model (``--served-model-name`` after the first)."""
    loaded_at: float = field(default_factory=time.time)
    max_token_bytes: int = field(init=False)
    """UTF-8 bytes of the longest vocabulary entry, measured once from the tokenizer."""

    def __post_init__(self) -> None:
        self.max_token_bytes = longest_token_bytes(self.tokenizer)

    @classmethod
    def load(
        cls,
        path: str | Path | CheckpointInfo,
        *,
        name: str | None = None,
        aliases: list[str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        engine_config: EngineConfig | None = None,
        lora: str | Path | None = None,
        lora_modules: dict[str, str] | None = None,
        content_markers: ContentMarkers = "text",
        engine_process: bool = True,
        core: CoreAddress | None = None,
        **config_overrides,
    ) -> Runtime:
        """Load the checkpoint at ``path`` (a folder, or what :func:`~telechat.model.checkpoint.inspect_checkpoint`
        read from it) (optionally with a LoRA adapter merged in memory) and start the engine.

        ``engine_process``: run the engine core in a process of its own, which loads the weights
        while this one loads the tokenizer (:class:`~telechat.engine.core_client.EngineClient`), or
        in a thread of this process (:class:`~telechat.engine.async_engine.AsyncEngine`).
        ``content_markers``: how marker strings typed inside chat contents are read (see
        :class:`~telechat.chat_format.ChatFormat`). ``lora_modules``: LoRA adapters (name -> folder)
        requests choose by name, batched with the base (needs ``engine_config.max_loras``). ``core``: join the
        engine core another process started there instead (the engine settings are then the core's)."""
        from telechat.chat_format import ChatFormat
        from telechat.engine.async_engine import AsyncEngine
        from telechat.engine.core_client import EngineClient
        from telechat.engine.core_process import build_engine
        from telechat.model.checkpoint import inspect_checkpoint
        from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

        from telechat.tokenizer import load_tokenizer

        info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path, need_tokenizer=True)
        path = Path(info.path).expanduser().resolve()
        if core is not None:
            engine = EngineClient.connect(core)
        else:
            spec = engine_spec(info, device=device, dtype=dtype, engine_config=engine_config, lora=lora,
                               lora_modules=lora_modules, **config_overrides)
            engine = EngineClient(spec) if engine_process else AsyncEngine(build_engine(spec))
        try:
            # No length limit in the tokenizer: the API refuses a prompt past the context itself (a 400 naming
            # it), so transformers' "longer than the maximum sequence length" warning would only be noise.
            tokenizer = load_tokenizer(path, model_max_length=VERY_LARGE_INTEGER)
            chat = ChatFormat(tokenizer, info.generation, content_markers=content_markers)
            engine.wait_ready()
        except BaseException:
            engine.shutdown(0)
            raise
        return cls(name=name or path.name, aliases=list(aliases or []), path=path, tokenizer=tokenizer, chat=chat,
                   engine=engine,
                   defaults=GenerationDefaults.from_config(info.generation), is_demo=info.is_demo)

    @property
    def names(self) -> list[str]:
        """Every name of the served model: its id, then its aliases."""
        return [self.name, *self.aliases]

    @property
    def max_model_len(self) -> int:
        """Longest prompt + reply this runtime accepts."""
        return self.engine.info.max_model_len

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: ``[0, vocab_size)``."""
        return self.engine.info.vocab_size

    @property
    def max_prompt_bytes(self) -> int:
        """An upper bound on the UTF-8 size of any text that fits the context: every token stands for
        at most ``max_token_bytes`` bytes (and at least one byte per character), so a longer text
        cannot fit and need not be tokenized to know it."""
        return self.max_model_len * self.max_token_bytes

    def sampling_params(self, **overrides) -> SamplingParams:
        """Request values over checkpoint defaults; ``None`` means "use the default"."""
        d = self.defaults
        values = dict(
            temperature=d.temperature if d.do_sample else 0.0, top_k=d.top_k if d.do_sample else 0,
            top_p=d.top_p if d.do_sample else 1.0, repetition_penalty=d.repetition_penalty,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("stop_token_ids", list(self.chat.stop_token_ids))
        return SamplingParams(**values)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     *, continuation: bool = False, lora: str | None = None,
                     after: str | None = None) -> AsyncIterator[StreamDelta]:
        """Generate and stream text deltas (``lora``: with that loaded adapter; ``after``: the id of a
        sibling choice of the same prompt, see ``Request.after``); closing the iterator early aborts the
        request.

        ``continuation``: the text continues the prompt (raw completions), so it is decoded in the
        prompt's context; chat replies start fresh after ``<_bot>``.
        """
        text = TextStream(self.tokenizer, params.stop, skip_token_ids=params.stop_token_ids,
                          prompt_ids=prompt_ids if continuation else None, min_tokens=params.min_tokens,
                          include_stop=params.include_stop_str_in_output)
        prompt_tokens = len(prompt_ids)
        completion = cached = 0
        times: dict[str, float] = {}  # the first token's queue and prefill seconds until a delta carries them
        skip = set(params.stop_token_ids)
        logprobs: list | None = [] if params.logprobs is not None else None  # entries whose text is not sent yet
        agen = self.engine.generate(prompt_ids, params, request_id, lora=lora, after=after)
        try:
            async for out in agen:
                completion = out.num_output_tokens or completion  # an engine that stopped reports no counts
                cached = max(cached, out.num_cached_tokens)
                if out.queue_s is not None:
                    times = {"queue_s": out.queue_s, "prefill_s": out.prefill_s}
                delta = text.feed(out.new_token_ids, finished=out.finished)
                if logprobs is not None and out.logprobs:
                    logprobs += [(t, *lp) for t, lp in zip(out.new_token_ids, out.logprobs) if t not in skip]
                if text.stopped and not out.finished:
                    yield StreamDelta(delta, "stop", prompt_tokens, completion, cached_tokens=cached, logprobs=logprobs,
                                      **times)
                    return
                if out.finished:
                    reason = "stop" if text.stopped else out.finish_reason
                    yield StreamDelta(delta, reason, prompt_tokens, completion, out.error, cached, logprobs, **times)
                    return
                if delta:
                    yield StreamDelta(delta, None, prompt_tokens, completion, cached_tokens=cached, logprobs=logprobs,
                                      **times)
                    logprobs = [] if logprobs is not None else None
                    times = {}
        finally:
            await agen.aclose()


def longest_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the tokenizer's longest vocabulary entry as spelled in the vocabulary; this
    bounds the text one token stands for (SentencePiece pieces and byte-level BPE alike)."""
    return max((len(piece.encode("utf-8", "surrogatepass")) for piece in tokenizer.get_vocab()), default=1)


def check_adapter(adapter: str | Path) -> Path:
    """The LoRA adapter folder, or :class:`~telechat.model.checkpoint.CheckpointError` saying what is wrong."""
    from telechat.model.checkpoint import CheckpointError

    adapter = Path(adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter} has no adapter_config.json; pass the LoRA adapter folder written by "
                              "`telechat finetune --method lora`")
    return adapter


DEFAULT_MAX_LORA_RANK = 64
"""LoRA rank the adapter slots hold unless an adapter given at start needs more."""


def lora_slot_rank(adapters: dict[str, str], requested: int | None) -> int:
    """The rank of the LoRA slots: ``requested``, else :data:`DEFAULT_MAX_LORA_RANK` or the largest ``r`` in
    the ``adapter_config.json`` of ``adapters`` (name -> folder) when higher."""
    if requested:
        return requested
    ranks = [DEFAULT_MAX_LORA_RANK]
    for folder in adapters.values():
        try:
            cfg = json.loads((Path(folder).expanduser() / "adapter_config.json").read_text(encoding="utf-8"))
            ranks.append(int(cfg.get("r", 0)))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # the engine reports what is wrong with the folder when it loads it
    return max(ranks)


def merge_adapter(model, adapter: str | Path):
    """Apply a PEFT LoRA adapter folder to ``model`` and merge it into the weights (serving without a
    merged checkpoint on disk)."""
    adapter = check_adapter(adapter)
    from peft import PeftModel

    log.info("merging LoRA adapter %s", adapter)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def resolve_model_path(path: str | Path | None) -> tuple[Path, bool]:
    """The model folder to serve: ``path`` (the caller's setting, e.g. ``--model`` / ``MODEL_PATH``),
    else the demo model (built on first use). Reads no environment.

    Returns ``(folder, is_builtin_demo)``.
    """
    from telechat.demo import ensure_demo_model

    if path:
        return Path(path).expanduser(), False
    log.info("no model configured (--model / MODEL_PATH): serving the built-in demo model")
    return ensure_demo_model(), True
