"""TeleChat model configuration.

Reads the official ``config.json`` keys exactly as released (``n_head``, ``n_layer``,
``ffn_hidden_size``, ``training_seqlen``, ``embed_layernorm``, ...) for TeleChat v1 (7B, 12B,
12B-V2) and TeleChat2 (``base_seqlen``, ``num_key_value_heads``).

NTK base length rule (docs/model.md, RoPE): v1 configs do not carry it; the official 7B modeling file
hard-codes 4096 and the 12B file 8192. We take ``base_seqlen`` when the config has it, else
infer it from the layout: a tied head (7B style, ``tie_word_embeddings`` absent or true) means
4096, an untied head (12B style) means 8192.
"""

from __future__ import annotations

from typing import Literal, get_args

from transformers import PreTrainedConfig

RopeMode = Literal["none", "ntk", "ntk+scaling"]
"""RoPE scaling modes: plain RoPE, NTK-aware base only, NTK base + attention scaling (official).
The one definition: settings models, flags and checks all use it."""
ROPE_MODES: tuple[str, ...] = get_args(RopeMode)

ARCHITECTURES = ("TelechatForCausalLM", "TeleChatForCausalLM", "TeleChat2ForCausalLM")

TIED_BASE_SEQLEN = 4096  # 7B layout (modeling_telechat.py of models/7B)
UNTIED_BASE_SEQLEN = 8192  # 12B / 12B-V2 layout


class TelechatConfig(PreTrainedConfig):
    """Configuration of a TeleChat causal LM, with the official key names.

    Derived values: ``head_dim = hidden_size // n_head``; ``num_key_value_heads`` defaults to
    ``n_head`` (v1 is MHA); ``base_seqlen`` follows the rule in the module docstring.
    """

    model_type = "telechat"
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "ffn_hidden_size",
        "rms_norm_eps": "layer_norm_epsilon",
        "n_embed": "hidden_size",
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 160256,
        hidden_size: int = 4096,
        n_layer: int = 30,
        n_head: int = 32,
        num_key_value_heads: int | None = None,
        ffn_hidden_size: int = 12288,
        layer_norm_epsilon: float = 1e-5,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        training_seqlen: int = 8192,
        base_seqlen: int | None = None,
        seq_length: int = 8192,
        rope_theta: float = 10000.0,
        rope_mode: str = "ntk+scaling",
        embed_layernorm: bool = False,
        apply_residual_connection_post_layernorm: bool = False,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pad_token_id: int | None = 3,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.num_key_value_heads = n_head if num_key_value_heads is None else num_key_value_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.training_seqlen = training_seqlen
        self.tie_word_embeddings = tie_word_embeddings
        self.base_seqlen = base_seqlen if base_seqlen is not None else (
            TIED_BASE_SEQLEN if tie_word_embeddings else UNTIED_BASE_SEQLEN
        )
        self.seq_length = seq_length
        self.rope_theta = rope_theta
        self.rope_mode = rope_mode
        self.embed_layernorm = embed_layernorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        # Official keys read by no modeling file (flash_attn, logn, alibi/fusion flags, ...) are
        # kept by PreTrainedConfig as plain attributes so save_pretrained round-trips them.
        super().__init__(**kwargs)
        self.validate_telechat()

    @property
    def head_dim(self) -> int:
        """Per-head width: 128 for 7B, 160 for 12B."""
        return self.hidden_size // self.n_head

    def validate_telechat(self) -> None:
        """Raise ``ValueError`` with the offending keys when the shapes cannot form a model."""
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.num_key_value_heads:
            raise ValueError(
                f"n_head {self.n_head} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode {self.rope_mode!r} is not one of {', '.join(ROPE_MODES)}")
        if self.training_seqlen <= 0 or self.base_seqlen <= 0:
            raise ValueError("training_seqlen and base_seqlen must be positive")
        archs = getattr(self, "architectures", None) or []
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"unknown architecture {unknown[0]!r}; TeleChat checkpoints declare one of {', '.join(ARCHITECTURES)}"
            )


class Telechat2Config(TelechatConfig):
    """TeleChat2 checkpoints that declare ``model_type: telechat2``; same keys and math."""

    model_type = "telechat2"


PRESETS: dict[str, dict] = {
    "7B": dict(vocab_size=160256, hidden_size=4096, n_layer=30, n_head=32, ffn_hidden_size=12288,
               tie_word_embeddings=True),
    "12B": dict(vocab_size=120000, hidden_size=5120, n_layer=38, n_head=32, ffn_hidden_size=12288,
                tie_word_embeddings=False),
    "1B": dict(vocab_size=120000, hidden_size=2048, n_layer=16, n_head=32, ffn_hidden_size=5460,
               tie_word_embeddings=False),
}
"""Named shapes of the released models (docs/model.md, shapes), for benchmarks and ``--from-scratch``."""


def preset(name: str, **overrides) -> TelechatConfig:
    """Build the config of a released model size (``7B``, ``12B``, ``1B``) with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TelechatConfig(**{**PRESETS[name], **overrides})
