"""TeleChat's NTK-aware RoPE and attention scaling inside vLLM, under a per-engine policy.

The rule itself is :func:`telechat.model.rope.rope_params` (docs/model.md, RoPE): for a sequence of length ``L``,
``L_eff = max(L, training_seqlen)`` picks the NTK factor, the rotary base and ``mscale``. Our own
engine fixes these per sequence at prefill. vLLM's rotary layer holds one cos/sin table per engine,
so here they are fixed **per engine**, from the longest sequence it admits (``max_model_len``):

- ``max_model_len <= training_seqlen`` (the default for the released checkpoints, 8192): every
  sequence has ``L_eff = training_seqlen``, so the table is exactly the official one (7B: base
  ≈ 30527.7, 12B: 10000, mscale 1) for every prompt.
- ``max_model_len > training_seqlen``: every sequence uses the parameters of a ``max_model_len``
  sequence, chosen by the config's ``rope_mode`` (``none``, ``ntk``, ``ntk+scaling``; the names of
  our engine's ``--rope-mode``). A prompt near ``max_model_len`` gets the official values; a
  shorter one gets a larger base (and with ``ntk+scaling`` a larger mscale) than the official code
  would give it. Set the mode with ``--hf-overrides '{"rope_mode": "ntk"}'``.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from telechat.model.config import TelechatConfig
from telechat.model.rope import RopeParams, inv_freq, rope_params


def engine_rope_params(config: TelechatConfig, max_model_len: int) -> RopeParams:
    """Rotary parameters shared by every sequence of an engine that admits ``max_model_len`` tokens."""
    return rope_params(
        max_model_len, head_dim=config.head_dim, training_seqlen=config.training_seqlen,
        base_seqlen=config.base_seqlen, theta=config.rope_theta, mode=config.rope_mode,
    )


class TelechatRotaryEmbedding(RotaryEmbedding):
    """vLLM's NeoX rotary layer (its kernels and cache layout) with TeleChat's base and ``mscale``.

    ``mscale`` multiplies both cos and sin, as the official code does, so q and k are each scaled.
    """

    def __init__(self, head_dim: int, max_position: int, params: RopeParams, dtype: torch.dtype) -> None:
        self.mscale = params.mscale  # read by _compute_cos_sin_cache, which the base __init__ calls
        super().__init__(head_dim, head_dim, max_position, params.base, True, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return inv_freq(base, self.rotary_dim).clone()

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return super()._compute_cos_sin_cache() * self.mscale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mscale={self.mscale}"
