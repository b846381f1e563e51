"""Build the model to train: a loaded checkpoint or a random init, optionally wrapped in PEFT LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from jobs.finetune.hparams import FinetuneArguments, ModelArguments
from jobs.finetune.parser import ArgsError
from jobs.quiet import import_gptqmodel_quietly, rank
from telechat.model.checkpoint import DTYPES, CheckpointError, inspect_checkpoint
from telechat.model.loader import load_model
from telechat.model.config import PRESETS, TelechatConfig, preset

log = logging.getLogger(__name__)


def load_dtype(args: FinetuneArguments) -> torch.dtype:
    """Dtype the weights are loaded in.

    LoRA keeps the frozen base in the training precision (half the memory; PEFT keeps the
    adapter in fp32). Full SFT loads fp32 master weights: the Trainer autocasts, and DeepSpeed
    casts to its bf16/fp16 config itself while keeping fp32 copies in the optimizer.
    """
    return DTYPES[args.train.precision] if args.train.method == "lora" else torch.float32


def scratch_config(m: ModelArguments, tokenizer) -> TelechatConfig:
    """Config of a random-init model: a preset or config.json plus the size overrides."""
    overrides = {k: v for k, v in dict(hidden_size=m.hidden_size, n_layer=m.layers, n_head=m.heads,
                                       ffn_hidden_size=m.ffn, vocab_size=m.vocab_size).items() if v is not None}
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, architectures=["TelechatForCausalLM"])
    try:
        if m.from_scratch in PRESETS:
            config = preset(m.from_scratch, **specials, **overrides)
        else:
            raw = json.loads(Path(m.from_scratch).read_text(encoding="utf-8"))
            raw = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "transformers_version")}
            config = TelechatConfig(**{**raw, **specials, **overrides})
    except (ValueError, TypeError) as e:
        raise ArgsError(f"--from-scratch {m.from_scratch}: {e}") from e
    if config.vocab_size < len(tokenizer):
        raise ArgsError(f"vocab size {config.vocab_size} cannot hold the tokenizer's {len(tokenizer)} tokens; "
                        f"pass --vocab-size {len(tokenizer)} or more")
    return config


def build_model(args: FinetuneArguments, tokenizer, zero3: bool) -> nn.Module:
    """The model to train, on CPU (the Trainer places it), LoRA-wrapped for ``--method lora``."""
    from transformers import AutoModelForCausalLM

    import telechat  # noqa: F401  (registers the Auto classes)

    dtype = load_dtype(args)
    m = args.model
    if m.from_scratch is not None:
        config = scratch_config(m, tokenizer)
        # from_config runs under deepspeed.zero.Init when ZeRO-3 is on: each rank only
        # materialises its shard of the random weights.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        log.info("random init from %s: %.1fM parameters", m.from_scratch, _count(model) / 1e6)
    elif zero3:
        # ZeRO-3 partitions weights while loading, which excludes the device_map load_model uses.
        inspect_checkpoint(m.model)
        try:
            model = AutoModelForCausalLM.from_pretrained(m.model, dtype=dtype)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"could not load {m.model}: {e}") from e
    else:
        model = load_model(m.model, device="cpu", dtype=dtype)
    model.config.use_cache = False  # no KV cache while training
    if args.train.method == "lora":
        model = add_lora(model, args)
    speed_up(model, args)
    if args.train.backend == "fsdp":
        model = shard_fsdp2(model, args.train.precision)
    return model


def shard_fsdp2(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2 as bench/finetune.py measured it: one unit per decoder block, the rest (embedding, tied
    head, final norm) in the root unit; fp32 master shards, bf16/fp16 compute, fp32 gradient reduction.

    Done here rather than by accelerate, which leaves an already sharded model as it is: accelerate
    1.15 puts the embedding, head and final norm in a unit of their own, which the chunked loss (the
    head called per chunk and again in backward) finds resharded mid-backward. Every rank holds the
    loaded weights (the same checkpoint, or the same seeded random init) until its shard is taken.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
          if precision in ("bf16", "fp16") else MixedPrecisionPolicy())
    for block in _telechat(model).transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _telechat(model: nn.Module) -> nn.Module:
    """The TeleChat model itself, under a PEFT wrapper if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_config(args: FinetuneArguments, tokenizer):
    """The config of the model the run trains (``--from-scratch`` or ``--model``)."""
    from transformers import AutoConfig

    import telechat  # noqa: F401  (registers the Auto classes)

    m = args.model
    return scratch_config(m, tokenizer) if m.from_scratch is not None else AutoConfig.from_pretrained(m.model)


def speed_up(model: nn.Module, args: FinetuneArguments) -> None:
    """``--loss-chunk-tokens`` and ``--compile`` on the TeleChat model itself (under PEFT), before
    the Trainer hands it to DeepSpeed or FSDP.

    ``block.compile()`` compiles each decoder block's call in place, on first use: parameter
    names and the state dict stay as they are, and FSDP2 shards compiled blocks as it would plain
    ones (torchtitan's order: compile per block, then ``fully_shard``).
    """
    t = args.train
    base = _telechat(model)
    base.loss_chunk_tokens = t.loss_chunk_tokens or None
    if t.compile == "on":
        for block in base.transformer.h:
            block.compile()
        if rank() == 0:
            log.info("compiling the %d decoder blocks (torch.compile): the first steps (and the first "
                     "evaluation) take about a minute longer", len(base.transformer.h))


def add_lora(model: nn.Module, args: FinetuneArguments) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA adapter on ``--lora-targets``; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    import_gptqmodel_quietly()  # PEFT imports it to look for quantized layers
    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    unknown = [t for t in args.lora_targets if t not in linear]
    if unknown:
        raise ArgsError(f"--lora-targets {','.join(unknown)}: no such linear layer; choose from {','.join(sorted(linear))}")
    config = LoraConfig(r=args.lora.lora_rank, lora_alpha=args.lora.lora_alpha, lora_dropout=args.lora.lora_dropout,
                        target_modules=args.lora_targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %.2fM trainable of %.1fM parameters", args.lora.lora_rank,
             args.lora.lora_alpha, ",".join(args.lora_targets), trainable / 1e6, _count(model) / 1e6)
    return model


def _count(model: nn.Module) -> int:
    # ZeRO-3 leaves empty placeholders; ds_numel is the real size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
