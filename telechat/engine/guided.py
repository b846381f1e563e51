"""Grammar-constrained decoding (structured output) with xgrammar (docs/engine.md, "Constrained decoding").

A request brings a :class:`GrammarSpec` (plain data: it crosses the process boundary inside
:class:`~telechat.engine.sampling.SamplingParams`). The engine core compiles it against the served
tokenizer on worker threads (:class:`GrammarCompiler`, compiled grammars cached LRU by size; the request
waits unscheduled meanwhile, its batch-mates do not), keeps one matcher per constrained request
(:class:`GuidedRequests`), advances it with every token the host reads, and
before each sampling fills a per-row token bitmask that the sampler applies to the logits
(:func:`allowed_tokens`). A grammar that is complete allows only the stop tokens, so its request
ends with finish reason "stop"; unconstrained rows never touch any of this.

xgrammar is imported on first use: servers that never see a constrained request do not load it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "ebnf")
CACHE_LIMIT_BYTES = 256 << 20
"""Memory the compiled-grammar cache may hold before it evicts the least recently used."""
GRAMMAR_TIMEOUT_S = 10.0
"""Default limit on building one grammar (the API's check, then the engine's compile): some inputs take
minutes (xgrammar 0.2.9 took 478 s for a JSON-schema ``pattern`` of ``[0-9a-f]{1,50000}``)."""
COMPILE_THREADS = 2
"""Threads an engine compiles grammars on."""
JSON_SEPARATORS = (", ", ": ")
"""JSON is constrained to one layout (no free whitespace): a small model cannot wander off into
endless blanks, and the text is the same for every sampler (docs/engine.md)."""
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
_BOUNDED_STRING_CHARACTER = re.compile(r'^(\S+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
"""xgrammar 0.2.9's rule for one character of a string with ``maxLength`` (or a key under
``propertyNames.maxLength``): any character but the quote, the backslash, CR and LF, so control
characters get through (invalid JSON) and escapes do not."""
_JSON_STRING_CHARACTER = r'\1 ::= (([^\\0-\\x1f\\"\\\\]) | ("\\\\" json_string_escape))'
_JSON_STRING_ESCAPE = 'json_string_escape ::= (([\\"\\\\/bfnrt]) | ("u" [A-Fa-f0-9]{4}))'
"""What one character of a JSON string is (RFC 8259): anything but the quote, the backslash and
U+0000-U+001F, or an escape."""


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled (invalid JSON schema, bad regular expression, ...)."""


@dataclass
class GrammarSpec:
    """What a request's output must match; plain strings so it serialises with the request.

    ``kind``: ``json_schema`` (``value`` = the schema as JSON text), ``json_object`` (any JSON
    object, ``value`` empty), ``regex`` (a regular expression), ``choice`` (``value`` = a JSON list
    of strings, the output is exactly one of them), ``ebnf`` (an xgrammar EBNF grammar, root rule
    ``root``).
    """

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")

    @property
    def key(self) -> tuple[str, str]:
        """Cache key of the compiled grammar."""
        return self.kind, self.value


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency of the serve extra
        raise GrammarError("structured output needs the xgrammar package (pip install 'telechat-stack[serve]')") from e
    return xgrammar


def _message(e: Exception) -> str:
    """xgrammar's error without its log prefix (time stamp and C++ source line)."""
    return _XGRAMMAR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("the choices must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


MAX_SAFE_INTEGER = 2**53 - 1
"""Integers without bounds in a schema are kept within ±(2^53 - 1), the range every JSON parser keeps exactly."""
_SCALAR_KEYS = ("enum", "const", "pattern", "format")


def json_bounds(max_tokens: int) -> tuple[int, int]:
    """``(max_chars, max_items)`` for the free-form parts of a JSON reply of ``max_tokens`` tokens:
    strings of at most ``max_tokens / 8`` characters, arrays of at most ``max_tokens / 32`` items
    (docs/engine.md, "Constrained decoding": why structured output needs bounds)."""
    return max(8, max_tokens // 8), max(2, max_tokens // 32)


def bound_json_schema(schema: Any, max_chars: int, max_items: int) -> Any:
    """A copy of ``schema`` whose free-form parts have bounds: strings without ``maxLength`` (and no
    enum/const/pattern/format) get ``max_chars``, arrays without ``maxItems`` get ``max_items``,
    integers without bounds ±(2^53 - 1), keys of open objects ``max_chars``. Only bounds are added,
    so every document of the bounded schema validates against ``schema``."""
    if isinstance(schema, list):
        return [bound_json_schema(s, max_chars, max_items) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bound_json_schema(v, max_chars, max_items) if isinstance(v, (dict, list)) and k not in _SCALAR_KEYS
           else v for k, v in schema.items()}
    kinds = out.get("type")
    kinds = {k for k in (kinds if isinstance(kinds, list) else [kinds]) if isinstance(k, str)}
    free = not any(k in out for k in _SCALAR_KEYS)
    if "string" in kinds and free and "maxLength" not in out:
        out["maxLength"] = max(max_chars, out.get("minLength", 0) if isinstance(out.get("minLength"), int) else 0)
    if "array" in kinds and "maxItems" not in out:
        out["maxItems"] = max(max_items, out.get("minItems", 0) if isinstance(out.get("minItems"), int) else 0)
    if "integer" in kinds and free:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_SAFE_INTEGER
    if "object" in kinds and out.get("additionalProperties") not in (None, False) and "propertyNames" not in out:
        out["propertyNames"] = {"maxLength": max_chars}
    return out


def any_json_object(max_chars: int, max_items: int, depth: int = 2) -> dict:
    """A JSON schema of any JSON object (``response_format`` json_object) with the bounds of
    :func:`bound_json_schema` and at most ``depth`` levels of nesting."""
    def value(level: int) -> dict:
        cases = [{"type": "string", "maxLength": max_chars},
                 {"type": "integer", "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER},
                 {"type": "boolean"}, {"type": "null"}]
        if level > 0:
            cases += [{"type": "array", "maxItems": max_items, "items": value(level - 1)}, obj(level - 1)]
        return {"anyOf": cases}

    def obj(level: int) -> dict:
        return {"type": "object", "maxProperties": max(2, max_items // 4), "propertyNames": {"maxLength": max_chars},
                "additionalProperties": value(level)}

    return obj(depth)


@lru_cache(maxsize=256)
def bounded_strings_ebnf(schema: str) -> str | None:
    """For a ``schema`` with length-bounded strings (``maxLength``, ``propertyNames.maxLength``): the EBNF
    grammar of its JSON documents (one layout, :data:`JSON_SEPARATORS`), xgrammar's with those strings'
    characters made JSON string characters (xgrammar 0.2.9 lets control characters into them, which no
    JSON parser reads, and refuses escapes). None when it has none (xgrammar's grammar is right as it is).
    Raises xgrammar's errors."""
    grammar = str(_xgr().Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS))
    fixed, count = _BOUNDED_STRING_CHARACTER.subn(_JSON_STRING_CHARACTER, grammar)
    return f"{fixed}\n{_JSON_STRING_ESCAPE}\n" if count else None


def _json_schema_text(spec: GrammarSpec) -> str:
    return spec.value if spec.kind == "json_schema" else '{"type": "object"}'


def grammar_of(spec: GrammarSpec) -> Any:
    """The xgrammar ``Grammar`` of ``spec``, built without a tokenizer (cheap): the check the API runs
    before queuing a request. Raises :class:`GrammarError` with a readable reason."""
    xgr = _xgr()
    try:
        if spec.kind in ("json_schema", "json_object"):
            schema = _json_schema_text(spec)
            ebnf = bounded_strings_ebnf(schema)
            if ebnf is not None:
                return xgr.Grammar.from_ebnf(ebnf)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec.value)))
        return xgr.Grammar.from_ebnf(spec.value)
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for bad input
        raise GrammarError(_message(e)) from e


def check_grammar(spec: GrammarSpec) -> None:
    """Raise :class:`GrammarError` when ``spec`` cannot be compiled."""
    grammar_of(spec)


class GrammarCompiler:
    """Compiles grammar specs against one tokenizer, keeping compiled grammars LRU up to
    :data:`CACHE_LIMIT_BYTES`. Thread-safe: the engine compiles on worker threads (:class:`GuidedRequests`)
    and looks finished grammars up from its loop (:meth:`cached`).

    ``load_tokenizer`` is called once, on the first compile: an engine that never sees a
    constrained request never builds the tokenizer's token table.
    """

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int):
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._prepare_lock = threading.Lock()
        self._lock = threading.Lock()
        """Guards the cache only (held for dict operations: the engine loop takes it)."""
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_bytes = 0

    @classmethod
    def from_path(cls, path: str, vocab_size: int) -> GrammarCompiler:
        """A compiler over the tokenizer of the checkpoint folder ``path``."""
        def load():
            from telechat.tokenizer import load_tokenizer

            return load_tokenizer(path)

        return cls(load, vocab_size)

    def prepare(self) -> None:
        """Build the tokenizer's token table now (seconds for a 160k vocabulary; done once)."""
        with self._prepare_lock:
            if self._compiler is None:
                xgr = _xgr()
                info = xgr.TokenizerInfo.from_huggingface(self._load_tokenizer(), vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)

    def cached(self, spec: GrammarSpec) -> Any | None:
        """The compiled grammar of ``spec`` if it was compiled before and is still kept, else None (no work)."""
        with self._lock:
            compiled = self._cache.get(spec.key)
            if compiled is not None:
                self._cache.move_to_end(spec.key)
            return compiled

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of ``spec`` (from the cache when compiled before)."""
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled
        self.prepare()
        grammar = grammar_of(spec)  # the API's check, the same parse: one dispatch over the kinds
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError
            raise GrammarError(_message(e)) from e
        self._keep(spec.key, compiled)
        return compiled

    def _keep(self, key: tuple[str, str], compiled: Any) -> None:
        size = compiled.memory_size_bytes
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = compiled
            self._cache_bytes += size
            while self._cache_bytes > CACHE_LIMIT_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.memory_size_bytes

    def matcher(self, spec: GrammarSpec, stop_token_ids: list[int], compiled: Any | None = None) -> Any:
        """A fresh matcher of ``spec`` (``compiled``: its compiled grammar, when at hand) that ends on
        ``stop_token_ids`` (the request's own)."""
        return _xgr().GrammarMatcher(compiled if compiled is not None else self.compile(spec),
                                     override_stop_tokens=list(stop_token_ids) or None)


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[S, V]`` bool of a packed ``[S, W]`` int32 token bitmask (bit ``t % 32`` of word ``t // 32``)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()


@dataclass
class _Compile:
    """One grammar compiling on a worker thread (shared by the requests that wait for the same spec)."""

    spec: GrammarSpec
    compiler: GrammarCompiler
    done: concurrent.futures.Future
    started: float | None = None
    """When a worker began compiling it (``time.monotonic``); None while it waits for a worker."""


_jobs: queue.SimpleQueue[_Compile] = queue.SimpleQueue()
_workers: list[threading.Thread] = []
_workers_lock = threading.Lock()


def _submit(job: _Compile) -> None:
    """Queue a compile for the process's :data:`COMPILE_THREADS` worker threads (started on first use)."""
    _jobs.put(job)
    with _workers_lock:
        if len(_workers) < COMPILE_THREADS:
            thread = threading.Thread(target=_work, name=f"grammar-compile-{len(_workers)}", daemon=True)
            thread.start()
            _workers.append(thread)


def _work() -> None:
    while True:
        job = _jobs.get()
        if not job.done.set_running_or_notify_cancel():  # its requests left before a worker got to it
            continue
        try:
            job.compiler.prepare()  # the token table, once: not part of any grammar's time
            job.started = time.monotonic()
            job.done.set_result(job.compiler.compile(job.spec))
        except BaseException as e:  # noqa: BLE001 - handed to the engine loop with the requests
            job.done.set_exception(e)


class GuidedRequests:
    """The matchers of the constrained requests an engine holds, by request id, and the grammars still
    compiling for the ones that wait.

    Compiling runs on the process's :data:`COMPILE_THREADS` daemon threads (xgrammar releases the GIL): a
    grammar that takes seconds to compile — the first one also builds the tokenizer's token table — holds
    back its own request only, never the engine loop. A compile running longer than ``timeout_s`` refuses its requests
    (:meth:`poll`).
    """

    def __init__(self, compiler: GrammarCompiler | None, timeout_s: float = GRAMMAR_TIMEOUT_S):
        self.compiler = compiler
        self.timeout_s = timeout_s
        self._matchers: dict[str, Any] = {}
        self._waiting: dict[str, tuple[_Compile, list[int]]] = {}
        """Request id -> (its grammar's compile, its stop tokens)."""

    def __bool__(self) -> bool:
        return bool(self._matchers)

    @property
    def compiling(self) -> bool:
        """True while any request waits for its grammar."""
        return bool(self._waiting)

    def add(self, request_id: str, spec: GrammarSpec, stop_token_ids: list[int]) -> bool:
        """Start a matcher for the request: now when its grammar was compiled before (True), else once a
        worker has compiled it (False: the request waits, see :meth:`poll`). :class:`GrammarError` when
        this engine cannot compile grammars at all."""
        if self.compiler is None:
            raise GrammarError("this engine has no tokenizer to compile grammars with")
        compiled = self.compiler.cached(spec)
        if compiled is not None:
            self._matchers[request_id] = self.compiler.matcher(spec, stop_token_ids, compiled)
            return True
        job = next((j for j, _ in self._waiting.values() if j.spec.key == spec.key), None)
        if job is None:
            job = _Compile(spec, self.compiler, concurrent.futures.Future())
            _submit(job)
        self._waiting[request_id] = (job, list(stop_token_ids))
        return False

    def poll(self) -> tuple[list[str], dict[str, str]]:
        """Requests whose grammar is ready now (their matchers are started), and those refused, with why:
        the grammar cannot be compiled, or compiling it ran past ``timeout_s`` (the compile finishes in the
        background and is cached; nobody waits for it)."""
        ready, refused = [], {}
        now = time.monotonic()
        for request_id, (job, stop_token_ids) in list(self._waiting.items()):
            if job.done.done():
                del self._waiting[request_id]
                error = job.done.exception()
                if error is None:
                    self._matchers[request_id] = self.compiler.matcher(job.spec, stop_token_ids, job.done.result())
                    ready.append(request_id)
                else:
                    refused[request_id] = (f"the grammar cannot be used: {error}" if isinstance(error, GrammarError)
                                           else f"compiling the grammar failed ({type(error).__name__}: {error})")
            elif job.started is not None and now - job.started > self.timeout_s:
                del self._waiting[request_id]
                refused[request_id] = (f"the grammar took longer than {self.timeout_s:g} s to compile; simplify it "
                                       "(long bounded repetitions such as {1,5000} are the usual cause)")
        return ready, refused

    def wait(self, timeout_s: float) -> None:
        """Block up to ``timeout_s`` until a compile finishes (the engine has nothing else to do)."""
        futures = {job.done for job, _ in self._waiting.values()}
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def clear(self) -> None:
        """Forget every matcher and waiting request (the engine failed them all)."""
        for request_id in list(self._waiting):
            self.remove(request_id)
        self._matchers.clear()

    def remove(self, request_id: str) -> None:
        """Forget a request's matcher or compile (it finished or left); unknown ids are ignored."""
        self._matchers.pop(request_id, None)
        job, _ = self._waiting.pop(request_id, (None, None))
        if job is not None and all(j is not job for j, _ in self._waiting.values()):
            job.done.cancel()  # nobody waits for it: skipped if no worker has started it

    def constrained(self, request_id: str) -> bool:
        """True while ``request_id`` has a matcher (not while it waits for its grammar)."""
        return request_id in self._matchers

    def accept(self, request_id: str, tokens: list[int]) -> bool:
        """Advance the request's matcher over ``tokens`` (read from a step); False when one is refused.
        A matcher that has ended (stop token accepted) takes further tokens unchecked (``ignore_eos``)."""
        m = self._matchers.get(request_id)
        if m is None:
            return True
        for t in tokens:
            if m.is_terminated():
                return True
            if not m.accept_token(t):
                return False
        return True

    def bitmask(self, request_ids: list[str], vocab_size: int) -> torch.Tensor | None:
        """``[S, W]`` int32 bitmask of the next token of each row (all ones for unconstrained rows and
        ended matchers), or None when no row is constrained."""
        rows = [(i, self._matchers.get(r)) for i, r in enumerate(request_ids)]
        rows = [(i, m) for i, m in rows if m is not None and not m.is_terminated()]
        if not rows:
            return None
        mask = torch.full((len(request_ids), bitmask_words(vocab_size)), -1, dtype=torch.int32)
        for i, m in rows:
            m.fill_next_token_bitmask(mask, i)
        return mask
