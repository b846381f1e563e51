"""Native TeleChat model (v1 7B/12B/12B-V2 and TeleChat2) on current transformers.

Reading order follows the paper: norm → rotary → attention → MLP → block → model → causal LM.
Math per docs/model.md (forward pass): weight-only RMSNorm, fused per-head interleaved ``key_value``, biases only on
``dense`` and ``down_proj``, NeoX rotary with NTK base and mscale on cos and sin.

Parameter names equal the official 12B names (``transformer.h.N.self_attention.query.weight``,
``lm_head.weight``), so ``save_pretrained`` writes checkpoints the official code loads. The 7B
layout (no ``transformer.`` prefix, tied head) is mapped on load by :mod:`telechat.model.checkpoint`.

Two entry points: ``forward`` (transformers: ``generate()``, training, ``Cache``) and
``forward_batch`` (the serving engine: flat tokens of many sequences, docs/engine.md, The model
seam). For serving, :meth:`TelechatForCausalLM.fuse_projections` merges ``query`` + ``key_value``
into one ``qkv`` Linear and ``gate_proj`` + ``up_proj`` into ``gate_up``; both entry points run
either layout, but only the unfused one has the official parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from telechat.model.attention import attention
from telechat.model.checkpoint import split_key_value
from telechat.model.config import Telechat2Config, TelechatConfig
from telechat.model.fp8 import Fp8Linear
from telechat.model.forward_batch import AttentionBackend, ForwardBatch
from telechat.model.kernels import fp8_rows_wanted, fused_add_rms_norm, linear, rms_norm, silu_mul, swiglu
from telechat.model.losses import chunked_causal_lm_loss
from telechat.model.rope import RopeParams, apply_rope, cos_sin, inv_freq, rope_params

# transformers renamed the cache argument/output field `past_key_values` -> `cache` (5.2x); accept both.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

ROPE_LENGTH_ATTR = "telechat_rope_length"
"""Attribute set on a transformers ``Cache``: the prefill length that fixed the sequence's RoPE."""


class TelechatRMSNorm(nn.Module):
    """RMSNorm with weight only: normalise in float32, cast back, then scale (Llama order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fp8_readers: tuple[nn.Module, ...] = ()
        """Serving: the FP8 Linears reading the output (:meth:`TelechatBlock.fuse_fp8_quantization`); the CUDA
        kernel also writes the output's FP8 rows when one of them would use them (a tuple: not submodules)."""

    def _quantize(self, x: torch.Tensor) -> bool:
        rows = x.numel() // x.shape[-1]
        return any(fp8_rows_wanted(m, rows) for m in self.fp8_readers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, quantize=self._quantize(x))

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``, the add fused into the norm; ``residual=None``: ``(norm(x), x)``."""
        if residual is None:
            return self(x), x
        return fused_add_rms_norm(x, residual, self.weight, self.eps, quantize=self._quantize(x))


class TelechatRotary:
    """Per-sequence rotary parameters from a config (no state: tables are built per forward)."""

    def __init__(self, config: TelechatConfig):
        self.config = config

    def params(self, length: int) -> RopeParams:
        """RoPE parameters for a sequence whose prefill chunk has ``length`` tokens."""
        c = self.config
        return rope_params(
            length, head_dim=c.head_dim, training_seqlen=c.training_seqlen, base_seqlen=c.base_seqlen,
            theta=c.rope_theta, mode=c.rope_mode,
        )

    def tables(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``positions.shape + (d,)`` for a sequence whose RoPE was fixed at ``length``."""
        p = self.params(length)
        return cos_sin(positions, inv_freq(p.base, self.config.head_dim, positions.device), p.mscale, dtype)


def _fused_linear(weights: list[torch.Tensor]) -> nn.Linear:
    """A bias-free Linear whose weight rows are ``weights`` stacked in order."""
    w = torch.cat(weights)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=weights[0].requires_grad)
    return fused


def _fp8_linears(*layers: nn.Module) -> bool:
    """True when every layer is a bias-free :class:`~telechat.model.fp8.Fp8Linear` with the same activation
    scheme, on one device."""
    return (all(type(m) is Fp8Linear and m.bias is None for m in layers)
            and len({m.activations for m in layers}) == 1 and len({m.weight.device for m in layers}) == 1)


def _plain_linears(*layers: nn.Module) -> bool:
    """True when every layer is exactly a bias-free ``nn.Linear`` (not GPTQ, not a LoRA wrapper) of one dtype."""
    return (all(type(m) is nn.Linear and m.bias is None for m in layers)
            and len({m.weight.dtype for m in layers}) == 1 and len({m.weight.device for m in layers}) == 1)


def _call(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return layer(x)


class TelechatAttention(nn.Module):
    """Multi-head (or grouped-query, TeleChat2 115B) self-attention with fused ``key_value``."""

    def __init__(self, config: TelechatConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.query = nn.Linear(h, self.n_head * self.head_dim, bias=False)
        self.key_value = nn.Linear(h, 2 * self.n_kv * self.head_dim, bias=False)
        self.dense = nn.Linear(self.n_head * self.head_dim, h, bias=True)
        self.qkv: nn.Linear | None = None
        """Serving only (:meth:`fuse`): rows of every q head, then K of every kv head, then V of every kv head."""

    def fuse(self) -> None:
        """Replace ``query`` + ``key_value`` by one ``qkv`` Linear (bias-free plain or FP8 Linears only;
        idempotent)."""
        if self.qkv is not None:
            return
        if _plain_linears(self.query, self.key_value):
            k, v = split_key_value(self.key_value.weight.data, self.n_kv, self.head_dim)
            self.qkv = _fused_linear([self.query.weight.data, k, v])
        elif _fp8_linears(self.query, self.key_value):
            rows = torch.arange(self.key_value.out_features, device=self.key_value.weight.device)
            k, v = split_key_value(rows, self.n_kv, self.head_dim)
            self.qkv = Fp8Linear.stack([(self.query, None), (self.key_value, k), (self.key_value, v)])
        else:
            return
        del self.query, self.key_value

    def project(
        self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, lin=_call
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v for ``x [..., T, H]``: ``[..., T, heads, d]`` each, rotated when ``cos/sin [..., T, d]``
        are given; ``lin(x, layer)`` applies a projection (the serving path passes :func:`linear`).

        The official ``key_value`` rows are interleaved per head: rows ``[2d·h, 2d·h+d)`` are K of
        head h and ``[2d·h+d, 2d·h+2d)`` its V.
        """
        lead = x.shape[:-1]
        if self.qkv is not None:
            nq, nkv = self.n_head * self.head_dim, self.n_kv * self.head_dim
            q, k, v = lin(x, self.qkv).split([nq, nkv, nkv], dim=-1)
            q, k, v = (t.view(*lead, -1, self.head_dim) for t in (q, k, v))
        else:
            q = lin(x, self.query).view(*lead, self.n_head, self.head_dim)
            kv = lin(x, self.key_value).view(*lead, self.n_kv, 2 * self.head_dim)
            k, v = kv[..., : self.head_dim], kv[..., self.head_dim :]
        if cos is None:
            return q, k, v
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attention: AttentionBackend, lin=linear) -> torch.Tensor:
        """Attention output ``[T, H]`` for flat tokens ``x [T, H]``; ``attention`` rotates, caches and attends;
        ``lin`` applies the projections (per-request LoRA: :meth:`~telechat.model.lora.LoraBatch.linear`)."""
        q, k, v = self.project(x, lin=lin)
        return lin(attention.attend(self.layer_idx, q, k, v, cos, sin).reshape(x.shape[0], -1), self.dense)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """Attention output for ``x [B, T, H]`` with an optional transformers cache."""
        q, k, v = self.project(x, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        causal = mask is None and q.shape[2] > 1  # (a chunk after cached positions: aligned at the bottom right)
        out = attention(q, k, v, mask=mask, causal=causal, dropout=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(*x.shape[:-1], self.n_head * self.head_dim)
        return self.dense(out)


class TelechatMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, bias only on ``down_proj``."""

    def __init__(self, config: TelechatConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=True)
        self.gate_up: nn.Linear | None = None
        """Serving only (:meth:`fuse`): ``gate_proj`` rows, then ``up_proj`` rows."""

    def fuse(self) -> None:
        """Replace ``gate_proj`` + ``up_proj`` by one ``gate_up`` Linear (bias-free plain or FP8 Linears only;
        idempotent)."""
        if self.gate_up is not None:
            return
        if _plain_linears(self.gate_proj, self.up_proj):
            self.gate_up = _fused_linear([self.gate_proj.weight.data, self.up_proj.weight.data])
        elif _fp8_linears(self.gate_proj, self.up_proj):
            self.gate_up = Fp8Linear.stack([(self.gate_proj, None), (self.up_proj, None)])
        else:
            return
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, lin=_call) -> torch.Tensor:
        """``lin(x, layer)`` applies a projection (the serving path passes :func:`linear`)."""
        if self.gate_up is not None:
            return lin(swiglu(lin(x, self.gate_up)), self.down_proj)
        return lin(silu_mul(lin(x, self.gate_proj), lin(x, self.up_proj)), self.down_proj)


class TelechatBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block with dropout on both residual branches (training only)."""

    def __init__(self, config: TelechatConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.self_attention = TelechatAttention(config, layer_idx)
        self.post_attention_layernorm = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = TelechatMLP(config)
        self.hidden_dropout = config.hidden_dropout
        # Unused by every released config (false), kept for fidelity: residual from the normed input.
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def fuse_fp8_quantization(self) -> None:
        """Serving: where the projections reading a norm's output (``qkv``, ``gate_up``) are FP8 Linears with
        dynamic (per-token) activations, the norm's kernel also writes its output's FP8 rows whenever they would
        use them, and they skip their own quantization launch — the same numbers. (``dense`` reads the attention
        output and ``down_proj`` the SwiGLU's, whose kernels spread a row over many programs: they quantize as
        before.) Idempotent; other models are left as they are."""
        attn, mlp = self.self_attention, self.mlp
        readers = [(self.input_layernorm, [attn.qkv] if attn.qkv is not None else [attn.query, attn.key_value]),
                   (self.post_attention_layernorm,
                    [mlp.gate_up] if mlp.gate_up is not None else [mlp.gate_proj, mlp.up_proj])]
        for norm, layers in readers:
            if all(isinstance(m, Fp8Linear) and m.activations == "dynamic" for m in layers):
                norm.fp8_readers = tuple(layers)
                for m in layers:
                    m.fp8_rows_in = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(x)
        attn = self.self_attention(normed, cos, sin, mask, past_key_values)
        h = (normed if self.post_ln_residual else x) + F.dropout(attn, self.hidden_dropout, self.training)
        normed = self.post_attention_layernorm(h)
        out = self.mlp(normed)
        return (normed if self.post_ln_residual else h) + F.dropout(out, self.hidden_dropout, self.training)

    def forward_batch(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      attention: AttentionBackend, lin=linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving form of :meth:`forward` (inference, flat tokens): the block's input is ``x + residual``
        (``residual=None``: ``x``) and it returns ``(mlp_out, residual)`` whose sum is its output, so
        each residual add runs fused into the next norm."""
        normed, residual = self.input_layernorm.add_forward(x, residual)
        if self.post_ln_residual:
            residual = normed
        attn = self.self_attention.forward_batch(normed, cos, sin, attention, lin)
        normed, residual = self.post_attention_layernorm.add_forward(attn, residual)
        if self.post_ln_residual:
            residual = normed
        return self.mlp(normed, lin), residual


class TelechatPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, init, checkpointing, no-split unit."""

    config_class = TelechatConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TelechatBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TelechatRMSNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)


def _attention_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    q_len: int,
    past_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``[B, 1, Tq, Tk]`` mask, or None when plain causal attention suffices.

    Combines causality, key padding (``attention_mask`` zeros) and, for packed training rows
    (``position_ids`` that restart at 0 inside a row), a block-diagonal mask so packed samples
    never attend to each other.
    """
    k_len = past_len + q_len
    packed = (
        position_ids is not None and past_len == 0 and q_len > 1
        and bool((position_ids[:, 1:] == 0).any())
    )
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not packed and not padded and (q_len == k_len or q_len == 1):
        return None
    q_pos = torch.arange(past_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if packed:
        seg = (position_ids == 0).cumsum(-1)  # (B, T): sample index within the row
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    if padded:
        mask = mask & attention_mask[:, None, None, :k_len].bool()
        # A padding query row would attend to nothing (NaN); let it see itself instead.
        mask = mask | (q_pos[:, None] == k_pos[None, :])[None, None]
    return mask


class TelechatModel(TelechatPreTrainedModel):
    """Embedding → blocks → final norm. Returns hidden states (and the cache when used)."""

    def __init__(self, config: TelechatConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = (
            TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon) if config.embed_layernorm else None
        )
        self.h = nn.ModuleList(TelechatBlock(config, i) for i in range(config.n_layer))
        self.ln_f = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.rotary = TelechatRotary(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        rope_length: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        ``rope_length`` pins the RoPE parameters to a sequence length (default: fixed at the
        first forward of a cache, i.e. the prompt length, or the chunk's own length without one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        past_key_values = cache if cache is not None else past_key_values
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.word_embeddings_layernorm is not None:
            x = self.word_embeddings_layernorm(x)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        elif not use_cache:
            past_key_values = None
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_len = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=x.device)[None].expand(x.shape[0], -1)
        if rope_length is None:
            rope_length = getattr(past_key_values, ROPE_LENGTH_ATTR, None) if past_len else None
        if rope_length is None:
            rope_length = int(position_ids.max()) + 1
        if past_key_values is not None and past_len == 0:
            setattr(past_key_values, ROPE_LENGTH_ATTR, rope_length)
        cos, sin = self.rotary.tables(position_ids, rope_length, x.dtype)
        mask = _attention_mask(attention_mask, position_ids, q_len, past_len, x.device)
        for block in self.h:
            x = block(x, cos, sin, mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{CACHE_FIELD: past_key_values})

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states ``[R, H]`` of the rows ``batch.logits_rows`` of flat tokens ``input_ids [T]``."""
        x = self.word_embeddings(input_ids)
        if self.word_embeddings_layernorm is not None:
            x = self.word_embeddings_layernorm(x)
        cos, sin = batch.rope_tables(x.dtype)
        lin = linear if batch.lora is None else batch.lora.linear
        residual = None
        for block in self.h:
            x, residual = block.forward_batch(x, residual, cos, sin, batch.attention, lin)
        if batch.logits_rows is not None:  # the last norm and the head only where logits are wanted
            x, residual = x[batch.logits_rows], residual[batch.logits_rows]
        return self.ln_f.add_forward(x, residual)[0]


class TelechatForCausalLM(TelechatPreTrainedModel, GenerationMixin):
    """TeleChat with its LM head; works with ``generate()`` and the transformers ``Cache`` API."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    loss_chunk_tokens: int | None = None
    """When set, training forwards with ``labels`` compute the loss this many tokens at a time
    without materialising the logits (:mod:`telechat.model.losses`) and return no logits."""

    def __init__(self, config: TelechatConfig):
        super().__init__(config)
        self.transformer = TelechatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def rope_params(self, length: int) -> RopeParams:
        """RoPE base and ``mscale`` of a sequence whose prompt has ``length`` tokens (fixed for its life)."""
        return self.transformer.rotary.params(length)

    def fuse_projections(self) -> None:
        """Serving only: merge each layer's ``query`` + ``key_value`` into ``qkv`` and ``gate_proj`` +
        ``up_proj`` into ``gate_up`` (one GEMM each instead of two), and let FP8 projections take their inputs
        quantized by the kernels producing them (:meth:`TelechatBlock.fuse_fp8_quantization`). Only plain
        ``nn.Linear`` and FP8 modules fuse (GPTQ-quantized ones stay as they are); idempotent; outputs are
        unchanged. The fused model no longer has the official parameter names, so train and save unfused
        models only."""
        for block in self.transformer.h:
            block.self_attention.fuse()
            block.mlp.fuse()
            block.fuse_fp8_quantization()

    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Serving forward (docs/engine.md, The model seam): float32 logits ``[R, V]`` of the rows
        ``batch.logits_rows`` (every row when None) of flat tokens ``input_ids [T]`` from any number of
        sequences. Inference only: call it under ``torch.inference_mode()``."""
        return linear(self.transformer.forward_batch(input_ids, batch), self.lm_head).float()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        rope_length: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and shifted cross-entropy when ``labels`` given; -100 = ignored)."""
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, rope_length=rope_length,
        )
        new_cache = getattr(out, CACHE_FIELD)
        hidden = out.last_hidden_state
        if labels is not None and self.training and self.loss_chunk_tokens:
            # Training: the loss without full logits (telechat.model.losses); no logits are returned.
            loss = chunked_causal_lm_loss(self.lm_head, hidden, labels, self.loss_chunk_tokens,
                                          kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, **{CACHE_FIELD: new_cache})
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_cache})


class Telechat2ForCausalLM(TelechatForCausalLM):
    """The same model for configs that declare ``model_type: telechat2``."""

    config_class = Telechat2Config
