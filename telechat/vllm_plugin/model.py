"""TeleChat v1 (7B and 12B layouts) as a vLLM model, built from vLLM's own parallel layers.

Module names follow the official checkpoints (``transformer.h.{i}.self_attention.dense``, ...), so
the 12B layout's keys load as they are and the 7B layout's (no ``transformer.`` prefix) go through
:func:`telechat.model.checkpoint.canonical_key`. Per layer:

| checkpoint tensor                     | vLLM parameter (tensor/pipeline parallel)                   |
|---------------------------------------|-------------------------------------------------------------|
| ``self_attention.query.weight``       | ``self_attention.qkv_proj`` shard ``q`` (QKVParallelLinear)  |
| ``self_attention.key_value.weight``   | ``qkv_proj`` shards ``k``, ``v`` (de-interleaved per head)   |
| ``self_attention.dense.weight/bias``  | ``self_attention.dense`` (RowParallelLinear, bias)          |
| ``mlp.gate_proj`` / ``mlp.up_proj``   | ``mlp.gate_up_proj`` shards 0 / 1 (MergedColumnParallel)    |
| ``mlp.down_proj.weight/bias``         | ``mlp.down_proj`` (RowParallelLinear, bias)                 |

The head is ``lm_head`` (12B) or tied to ``word_embeddings`` (7B, ``tie_word_embeddings`` true). An FP8
head (``telechat quantize --method fp8 --quantize-head``: ``lm_head.weight`` E4M3 with ``weight_scale``) is
dequantized on load into vLLM's dense head: the same weights, with unquantized activations.
Math as :mod:`telechat.model.modeling`: pre-norm blocks, RMSNorm, SwiGLU, NeoX RoPE with the NTK base and
mscale of :mod:`telechat.vllm_plugin.rope`, causal MHA/GQA scaled by ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from telechat.model.checkpoint import canonical_key, split_key_value
from telechat.model.config import TelechatConfig
from telechat.model.fp8 import HEAD, fp8_head
from telechat.vllm_plugin.rope import TelechatRotaryEmbedding, engine_rope_params

STACKED = {  # checkpoint module → (fused vLLM module, shard id)
    ".self_attention.query.": (".self_attention.qkv_proj.", "q"),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}
KEY_VALUE = ".self_attention.key_value."


class TelechatAttention(nn.Module):
    """Fused q/k/v projection, TeleChat RoPE, vLLM paged attention, ``dense`` output with bias."""

    def __init__(self, config: TelechatConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        if config.n_head % tp:
            raise ValueError(f"n_head {config.n_head} is not divisible by tensor_parallel_size {tp}")
        self.num_heads = config.n_head // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)  # replicated when fewer than tp
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.n_head, config.num_key_value_heads, bias=False,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.dense = RowParallelLinear(
            config.n_head * self.head_dim, config.hidden_size, bias=True,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.dense",
        )
        max_len = vllm_config.model_config.max_model_len
        self.rotary_emb = TelechatRotaryEmbedding(
            self.head_dim, max_len, engine_rope_params(config, max_len), torch.get_default_dtype(),
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.dense(self.attn(q, k, v))
        return out


class TelechatMLP(nn.Module):
    """SwiGLU with bias only on ``down_proj``."""

    def __init__(self, config: TelechatConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.ffn_hidden_size] * 2, bias=False,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, bias=True,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.down_proj",
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class TelechatBlock(nn.Module):
    """Pre-norm block; the residual is the normed input when ``apply_residual_connection_post_layernorm``."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = TelechatAttention(config, vllm_config, f"{prefix}.self_attention")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = TelechatMLP(config, vllm_config, f"{prefix}.mlp")
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(x)
        h = (normed if self.post_ln_residual else x) + self.self_attention(positions, normed)
        normed = self.post_attention_layernorm(h)
        return (normed if self.post_ln_residual else h) + self.mlp(normed)


class TelechatModel(nn.Module):
    """Embedding (+ optional embedding RMSNorm), this pipeline stage's blocks, final ``ln_f``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.word_embeddings",
            )
        else:
            self.word_embeddings = PPMissingLayer()
        self.word_embeddings_layernorm = (
            RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            if config.embed_layernorm and pp.is_first_rank else None
        )
        self.start_layer, self.end_layer, self.h = make_layers(
            config.n_layer, lambda prefix: TelechatBlock(vllm_config, prefix), prefix=f"{prefix}.h",
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        return self.word_embeddings_layernorm(x) if self.word_embeddings_layernorm is not None else x

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            x = intermediate_tensors["hidden_states"]
        for block in islice(self.h, self.start_layer, self.end_layer):
            x = block(positions, x)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x})
        return self.ln_f(x)


class TelechatForCausalLM(nn.Module, SupportsPP):
    """TeleChat v1 causal LM for vLLM (``architectures: ["TelechatForCausalLM"]``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, TelechatConfig):
            raise TypeError(f"expected a TelechatConfig (model_type telechat), got {type(config).__name__}")
        self.config = config
        self.fp8_head = fp8_head(config)
        """The checkpoint's head is FP8 (``--quantize-head``): served dense, dequantized in :meth:`load_weights`."""
        self.transformer = TelechatModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=None if self.fp8_head else vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.transformer.word_embeddings)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load official tensors (either layout) into this rank's shards; returns the parameters loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        head: dict[str, torch.Tensor] = {}  # an FP8 head's tensors, until its weight and scale are both read
        for key, tensor in weights:
            name = canonical_key(key)
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the tied head is the embedding; a stray copy in the checkpoint is ignored
            if self.fp8_head and name.startswith(f"{HEAD}."):
                head[name.removeprefix(f"{HEAD}.")] = tensor
                if not {"weight", "weight_scale"} <= head.keys():
                    continue  # input_scale (static activations) has no use in the dense head
                name, tensor = f"{HEAD}.weight", head.pop("weight").float() * head.pop("weight_scale").float()
            for target, shard, part in self._shards(name, tensor):
                if is_pp_missing_parameter(target, self):
                    continue
                if target not in params:
                    raise ValueError(f"unexpected tensor {key!r} in the checkpoint (no parameter {target!r})")
                param = params[target]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, part) if shard is None else loader(param, part, shard)
                loaded.add(target)
        if head.keys() - {"input_scale"}:
            raise ValueError(f"the checkpoint's FP8 {HEAD} lacks its weight or weight_scale (has {sorted(head)})")
        return loaded

    def _shards(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, str | int | None, torch.Tensor]]:
        """(parameter, shard id or None, tensor) pieces of one checkpoint tensor."""
        if KEY_VALUE in name:
            target = name.replace(KEY_VALUE, ".self_attention.qkv_proj.")
            if tensor.numel() == 1:  # a per-tensor scale (FP8 input_scale) is K's and V's alike
                yield target, "k", tensor
                yield target, "v", tensor
                return
            k, v = split_key_value(tensor, self.config.num_key_value_heads, self.config.head_dim)
            yield target, "k", k
            yield target, "v", v
            return
        for source, (fused, shard) in STACKED.items():
            if source in name:
                yield name.replace(source, fused), shard, tensor
                return
        yield name, None, tensor
