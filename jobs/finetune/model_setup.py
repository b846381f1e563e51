"""Build the model to train: a loaded checkpoint or a random init, optionally wrapped in PEFT LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from jobs.finetune.hparams import FinetuneArguments, ModelArguments
from jobs.finetune.parser import ArgsError
from jobs.quiet import import_gptqmodel_quietly
from telechat.checkpoint import DTYPES, CheckpointError, inspect_checkpoint, load_model
from telechat.config import PRESETS, TelechatConfig, preset

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
    return model


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
