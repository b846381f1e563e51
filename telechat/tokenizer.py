"""TeleChat tokenizers: SentencePiece (12B / 12B-V2) slow + fast, byte-level BPE (7B), registration.

12B (docs/tokenizers.md): a SentencePiece BPE ``tokenizer.model`` (byte fallback, split digits, dummy prefix
on, identity normalizer). ``TelechatTokenizer`` wraps it with the ``sentencepiece`` library;
``TelechatTokenizerFast`` is the same tokenizer converted to a ``tokenizers`` graph. Both give the
same ids and the same decoded text.

Choices that differ from the official remote code, on purpose:

- ``<_user>``, ``<_bot>``, ``<_system>`` (user-defined pieces 20/21/22) and the named special
  tokens (``<_end>``, ``<_pad>``, ``<_start>``, the configured unk) are *special tokens* that always
  split the text (``single_word`` from the official config is dropped). Each text chunk between
  two of them is then encoded on its own, with its own SentencePiece dummy prefix, exactly as the
  official ``chat()`` and SFT code build ids segment by segment (docs/chat-format.md). So
  ``tokenizer("<_user>你好<_bot>")`` == ``[20] + tokenizer("你好") + [21]``, which is what makes
  ``apply_chat_template`` agree with ``telechat.chat_format``. The official tokenizer would pass
  that whole string to SentencePiece and add a lone ``▁`` (id 111931) before ``<_user>``.
- Decoding is one SentencePiece-style pass over the whole sequence: pieces joined, ``▁`` → space,
  byte-fallback pieces re-assembled into UTF-8 (one U+FFFD per byte of an invalid run), special
  tokens written as their text (or dropped with ``skip_special_tokens``), and one leading space
  removed at the very start (the dummy prefix). The official code also adds a space before a
  special token that follows text; the fast tokenizer cannot express that, so neither does ours.

7B: ``tokenizer.json`` (byte-level BPE, ``tokenizer_class: BloomTokenizerFast``) is loaded by
transformers' generic fast tokenizer; :func:`build_demo_tokenizer` writes a small one of that kind.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken as RustAddedToken
from tokenizers import Regex
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import AddedToken, PreTrainedTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPIECE_SPACE = "▁"
MARKER_TOKENS = ("<_user>", "<_bot>", "<_system>")
"""TeleChat dialog markers; special whenever the vocabulary holds them."""

SP_MODEL_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _special(token: str | AddedToken | None) -> AddedToken | None:
    """A special token that always splits the text and is matched on the raw text (see module doc)."""
    if token is None:
        return None
    return AddedToken(str(token), special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _load_sp_proto(vocab_file: str):
    # The proto ships with the sentencepiece wheel; protobuf is a core dependency.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(vocab_file).read_bytes())
    return proto


def _special_kwargs(vocab_pieces: set[str], kwargs: dict[str, Any], defaults: dict[str, str]) -> dict[str, Any]:
    """Normalise bos/eos/unk/pad and add the dialog markers found in the vocabulary as extra specials.

    ``kwargs`` may carry the extras under the v4 name (``additional_special_tokens``) or the v5 one
    (``extra_special_tokens``); both are merged and passed on under the v4 name, which v5 converts.
    """
    out = {name: _special(kwargs.pop(name, default)) for name, default in defaults.items()}
    extras: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = kwargs.pop(key, None) or []
        extras += [str(t) for t in (value.values() if isinstance(value, dict) else value)]
    extras += [m for m in MARKER_TOKENS if m in vocab_pieces]
    out["additional_special_tokens"] = [_special(t) for t in dict.fromkeys(extras)]
    return out


def _byte_pieces(text: str) -> list[str]:
    """``text`` as SentencePiece byte-fallback pieces (``<0x3C>``...)."""
    return [f"<0x{b:02X}>" for b in text.encode("utf-8")]


def _utf8_or_replacement(run: bytearray) -> str:
    # Same rule as tokenizers' ByteFallback decoder: an invalid run becomes one U+FFFD per byte.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


# ---------------------------------------------------------------------------------------------
# slow (sentencepiece)


class TelechatTokenizer(PreTrainedTokenizer):
    """Slow TeleChat 12B tokenizer over a SentencePiece ``tokenizer.model``.

    ``add_bos_token``/``add_eos_token`` come from tokenizer_config.json (both false for the official
    12B); when on, each sequence is wrapped as ``bos + ids + eos``.
    """

    vocab_files_names = {"vocab_file": SP_MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<_unk>",
        bos_token: str | AddedToken = "<_start>",
        eos_token: str | AddedToken = "<_end>",
        pad_token: str | AddedToken = "<_pad>",
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        sp_model_kwargs: dict[str, Any] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        # get_vocab() is called many times while the base class registers special tokens.
        self._base_vocab = {self.sp_model.IdToPiece(i): i for i in range(self.sp_model.GetPieceSize())}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.update(
            unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token
        )
        specials = _special_kwargs(
            set(self._base_vocab),
            kwargs,
            {"unk_token": "<_unk>", "bos_token": "<_start>", "eos_token": "<_end>", "pad_token": "<_pad>"},
        )
        super().__init__(
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **specials,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (added tokens excluded)."""
        return self.sp_model.GetPieceSize()

    def get_vocab(self) -> dict[str, int]:
        """Piece → id, including added tokens."""
        vocab = dict(self._base_vocab)
        vocab.update(self._added_tokens_encoder if hasattr(self, "_added_tokens_encoder") else {})
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # One chunk between special tokens; SentencePiece adds its dummy prefix to each chunk.
        pieces = self.sp_model.encode(text, out_type=str)
        if any(p in MARKER_TOKENS for p in pieces):
            # Only with split_special_tokens (markers are split off before this otherwise):
            # SentencePiece extracts its user-defined marker pieces from any text, so a marker typed
            # as text becomes its UTF-8 byte pieces, which decode to the same text.
            pieces = [b for p in pieces for b in (_byte_pieces(p) if p in MARKER_TOKENS else [p])]
        return pieces

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces like the fast decoder chain: ``▁``→space, byte runs → UTF-8, strip one leading space."""
        parts: list[str] = []
        run = bytearray()
        for token in tokens:
            byte = _BYTE_PIECE.match(token)
            if byte:
                run.append(int(byte.group(1), 16))
                continue
            if run:
                parts.append(_utf8_or_replacement(run))
                run = bytearray()
            parts.append(token.replace(SPIECE_SPACE, " "))
        if run:
            parts.append(_utf8_or_replacement(run))
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        # Whole-sequence decode (see module doc); overridden so every transformers 5.x behaves alike.
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens))
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if cleanup else text

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``bos + ids + eos`` per sequence, each part only when enabled in the config."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where :meth:`build_inputs_with_special_tokens` added a token."""
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write ``tokenizer.model`` (the serialized SentencePiece proto) into ``save_directory``."""
        out = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + SP_MODEL_FILE)
        out.write_bytes(self.sp_model.serialized_model_proto())
        return (str(out),)


# ---------------------------------------------------------------------------------------------
# fast (tokenizers), converted from the same tokenizer.model


@functools.lru_cache(maxsize=4)
def _cached_merges(vocab_file: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    # ~1 s for the 120k-piece 12B model; keyed by mtime/size so an edited file is re-read.
    return tuple(_spm_merges(_load_sp_proto(vocab_file)))


def _spm_merges(proto) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece BPE: a pair merges iff the joined piece is a normal
    piece, and SentencePiece picks the candidate whose joined piece scores highest, so merges are
    ranked by that score (ties by piece id, then by split position)."""
    normal = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = []
    for piece, (pid, score) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, pid, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_spm_backend(vocab_file: str, special_tokens: list[str], add_bos: str | None = None, add_eos: str | None = None) -> Tokenizer:
    """Convert a SentencePiece BPE ``tokenizer.model`` into an equivalent ``tokenizers.Tokenizer``.

    - normalizer: dummy prefix ``▁`` + spaces → ``▁`` (the proto's identity rule, escaped whitespace);
    - user-defined pieces (digits, ``\\n``, ``_``…, ``<reserveN>``) are isolated as pre-tokens and
      never merged, as in SentencePiece, so ``"12"`` → ``▁``, ``1``, ``2``;
    - ``special_tokens`` are matched on the raw text, so each chunk between them gets its own prefix;
    - decoder: ``▁``→space, byte fallback, fuse, strip one leading space.
    """
    proto = _load_sp_proto(vocab_file)
    if proto.trainer_spec.model_type != 2:  # 2 == BPE in sentencepiece_model.proto
        raise ValueError(f"{vocab_file}: only SentencePiece BPE models are supported (TeleChat 12B is BPE)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    stat = Path(vocab_file).stat()
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    # ignore_merges: a pre-token that is itself a piece (the user-defined symbols below) maps to it
    # directly, as SentencePiece's prefix matcher does; merges would never build "<reserve1>" or "__".
    merges = list(_cached_merges(str(vocab_file), stat.st_mtime_ns, stat.st_size))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, ignore_merges=True)
    )
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    # User-defined pieces (digits, "\n", "_"…, "<reserveN>") are never merged by SentencePiece: isolate
    # them as pre-tokens, longest first like its prefix matcher. Not added tokens: tokenizers would
    # glue the dummy "▁" onto a leading one and decode added tokens with spaces between them.
    specials = set(special_tokens)
    user_defined = sorted((p.piece for p in proto.pieces if p.type == 4 and p.piece not in specials), key=len, reverse=True)
    if user_defined:
        pattern = "|".join(re.escape(p) for p in user_defined)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.add_special_tokens([RustAddedToken(t, special=True, normalized=False) for t in special_tokens])
    decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decode)
    # bos + $A + eos per sequence, each only when enabled (tokenizer_config add_bos/add_eos_token).
    def template(seq: str, type_id: int) -> str:
        parts = ([add_bos] if add_bos else []) + [f"${seq}"] + ([add_eos] if add_eos else [])
        return " ".join(f"{p}:{type_id}" for p in parts)

    used = list(dict.fromkeys(t for t in (add_bos, add_eos) if t))
    tok.post_processor = processors.TemplateProcessing(
        single=template("A", 0),
        pair=template("A", 0) + " " + template("B", 1),
        special_tokens=[(t, vocab[t]) for t in used],
    )
    return tok


class TelechatTokenizerFast(PreTrainedTokenizerFast):
    """Fast TeleChat 12B tokenizer: ``tokenizer.model`` converted by :func:`build_spm_backend`
    (or a ``tokenizer.json`` saved from it). Ids and decodes equal :class:`TelechatTokenizer`."""

    vocab_files_names = {"vocab_file": SP_MODEL_FILE, "tokenizer_file": TOKENIZER_JSON}
    slow_tokenizer_class = TelechatTokenizer
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        unk_token: str | AddedToken = "<_unk>",
        bos_token: str | AddedToken = "<_start>",
        eos_token: str | AddedToken = "<_end>",
        pad_token: str | AddedToken = "<_pad>",
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("sp_model_kwargs", None)
        tokenizer_object = kwargs.pop("tokenizer_object", None)
        kwargs.update(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
        pieces: set[str] = set()
        if vocab_file is not None and Path(vocab_file).is_file():
            pieces = {p.piece for p in _load_sp_proto(vocab_file).pieces}
        specials = _special_kwargs(
            pieces,
            kwargs,
            {"unk_token": "<_unk>", "bos_token": "<_start>", "eos_token": "<_end>", "pad_token": "<_pad>"},
        )
        has_json = tokenizer_file is not None and Path(tokenizer_file).is_file()
        if tokenizer_object is None and not has_json:
            if not pieces:
                raise FileNotFoundError(f"TelechatTokenizerFast needs {SP_MODEL_FILE} or {TOKENIZER_JSON}")
            names = [str(specials[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
            names += [str(t) for t in specials["additional_special_tokens"]]
            tokenizer_object = build_spm_backend(
                vocab_file,
                list(dict.fromkeys(names)),
                add_bos=str(specials["bos_token"]) if add_bos_token else None,
                add_eos=str(specials["eos_token"]) if add_eos_token else None,
            )
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_file=tokenizer_file if has_json else None,
            tokenizer_object=tokenizer_object,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **specials,
            **kwargs,
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        # transformers 5.x would pre-extract vocab/merges from tokenizer.model with its generic
        # converter; our __init__ does the conversion itself, so hand the files through untouched.
        return kwargs


# ---------------------------------------------------------------------------------------------
# loading and registration


def register_tokenizers() -> None:
    """Make ``AutoTokenizer`` resolve ``tokenizer_class: TelechatTokenizer`` (official 12B folders,
    whose ``auto_map`` points at remote code we do not ship) and ``model_type: telechat`` to our
    classes, without ``trust_remote_code``. transformers 5.x looks names up in the classes passed to
    ``AutoTokenizer.register`` (slow name → fast class alias); idempotent."""
    from transformers import AutoTokenizer

    from telechat.model.config import TelechatConfig

    AutoTokenizer.register(
        TelechatConfig,
        slow_tokenizer_class=TelechatTokenizer,
        fast_tokenizer_class=TelechatTokenizerFast,
        exist_ok=True,
    )


def load_tokenizer(path: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a TeleChat folder (12B ``tokenizer.model`` or 7B ``tokenizer.json``).

    Raises ``FileNotFoundError`` naming the folder when it holds neither file.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not (folder / SP_MODEL_FILE).is_file() and not (folder / TOKENIZER_JSON).is_file():
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected {SP_MODEL_FILE} (TeleChat 12B) or {TOKENIZER_JSON} (TeleChat 7B)"
        )
    register_tokenizers()
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


# ---------------------------------------------------------------------------------------------
# demo tokenizer (7B style, byte-level BPE)

DEMO_SPECIAL_TOKENS = ("<unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>")
"""Fixed ids 0..6 of the demo tokenizer, in this order."""


def demo_corpus() -> str:
    """The small built-in bilingual training text (``telechat/data/demo_corpus.txt``)."""
    return resources.files("telechat").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")


def build_demo_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> dict[str, int]:
    """Train a small 7B-style byte-level BPE ``tokenizer.json`` offline and save a loadable folder.

    Writes tokenizer.json, tokenizer_config.json (``BloomTokenizerFast`` like the official 7B) and
    special_tokens_map.json. ``vocab_size`` is an upper bound: the tiny corpus may yield fewer
    merges; use ``len(tokenizer)`` for the embedding size. Returns the ids for generation_config.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(unk_token=None))
    # Byte-level: every string is encodable and decodes back exactly (Chinese, emoji included).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[RustAddedToken(t, special=True, normalized=False) for t in DEMO_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus().splitlines(keepends=True), trainer=trainer)
    tok.save(str(out / TOKENIZER_JSON))

    named = {"bos_token": "<_start>", "eos_token": "<_end>", "unk_token": "<unk>", "pad_token": "<_pad>"}
    special_map = {**named, "additional_special_tokens": list(MARKER_TOKENS)}
    config = {
        **special_map,
        "tokenizer_class": "BloomTokenizerFast",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 8192,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ids = {t: tok.token_to_id(t) for t in DEMO_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<_start>"],
        "eos_token_id": ids["<_end>"],
        "pad_token_id": ids["<_pad>"],
        "user_token_id": ids["<_user>"],
        "bot_token_id": ids["<_bot>"],
    }
