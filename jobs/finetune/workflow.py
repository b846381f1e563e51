"""``run_sft``: the fine-tuning recipe, tokenizer → data → model → collator → trainer → export."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from jobs.finetune.data import load_conversations
from jobs.finetune.dataset import Collator, RowDataset, build_rows, encode_all
from jobs.finetune.export import copy_companions, publish, temp_dir, write_generation_config
from jobs.finetune.hparams import FinetuneArguments
from jobs.finetune.merge import merge_lora
from jobs.finetune.model_setup import build_model
from jobs.finetune.trainer import SFTTrainer
from telechat.chat_format import ChatFormat
from telechat.checkpoint import DTYPES
from telechat.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent
ADAM_BETAS = (0.9, 0.95)  # the official TeleChat fine-tuning betas (SPEC.md §7)


def deepspeed_config(args: FinetuneArguments) -> str | None:
    """The DeepSpeed JSON for ``--zero``/``--offload`` (or ``--deepspeed-config``); None without DeepSpeed."""
    t = args.train
    if t.deepspeed_config:
        return t.deepspeed_config
    if t.zero == 0:
        return None
    return str(CONFIG_DIR / f"ds_zero{t.zero}{'_offload' if t.offload else ''}.json")


def init_deepspeed_distributed() -> None:
    """Start DeepSpeed's process group before the model exists (ZeRO-3 partitions weights at init
    and sizes its batch from DeepSpeed's own world size). Run without a launcher, give it a
    one-process rendezvous instead of the MPI discovery it would otherwise attempt."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()


def training_arguments(args: FinetuneArguments, ds_config: str | None, has_eval: bool) -> TrainingArguments:
    """Map our options onto ``transformers.TrainingArguments``."""
    t = args.train
    return TrainingArguments(
        output_dir=t.output, seed=t.seed, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        deepspeed=ds_config, **_checkpointing(args.model.gradient_checkpointing),
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        logging_steps=t.logging_steps, logging_first_step=True, report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
    )


def _checkpointing(enabled: bool) -> dict:
    """Activation-checkpointing arguments under their name in this transformers version (renamed
    from ``gradient_checkpointing`` in 5.2x; both exist in between)."""
    if not enabled:
        return {}
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    # Non-reentrant checkpointing needs no input grads, which frozen-embedding LoRA would lack.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def run_sft(args: FinetuneArguments) -> Path:
    """Train and export; returns the final checkpoint folder (``OUTPUT/model``, or ``OUTPUT/adapter``
    for LoRA with ``--no-merge``)."""
    t, m, d = args.train, args.model, args.data
    output = Path(t.output)
    set_seed(t.seed)
    if t.overwrite and int(os.environ.get("RANK", "0")) == 0:
        # A stale, higher-numbered checkpoint would be taken for this run's newest one by --resume.
        for old in output.glob("checkpoint-*"):
            shutil.rmtree(old)

    source = Path(m.model) if m.model else None
    tok_dir = Path(m.tokenizer) if m.tokenizer else source
    tokenizer = load_tokenizer(tok_dir)
    gen_file = (source or tok_dir) / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    chat = ChatFormat(tokenizer, generation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = chat.end_id  # the Trainer counts tokens != pad as real ones

    conversations = load_conversations(d.data, t.seed)
    n_eval = int(len(conversations) * d.eval_split)
    if d.eval_split and not n_eval:
        log.warning("--eval-split %g of %d conversations holds out none; eval is skipped", d.eval_split, len(conversations))
    train_rows = build_rows(encode_all(chat, conversations[n_eval:], d.max_seq_len, d.overlong), d.max_seq_len, d.packing)
    random.Random(t.seed).shuffle(train_rows)
    eval_rows = (build_rows(encode_all(chat, conversations[:n_eval], d.max_seq_len, d.overlong), d.max_seq_len, d.packing)
                 if n_eval else None)

    ds_config = deepspeed_config(args)
    if ds_config:
        init_deepspeed_distributed()
    # Created before the model: with ZeRO-3 it switches model creation to partitioned init.
    targs = training_arguments(args, ds_config, has_eval=eval_rows is not None)
    model = build_model(args, tokenizer, zero3=is_deepspeed_zero3_enabled())
    trainer = SFTTrainer(
        model=model, args=targs, data_collator=Collator(tokenizer.pad_token_id), train_dataset=RowDataset(train_rows),
        eval_dataset=RowDataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
    )
    if t.resume:
        log.info("resuming from %s (weights, optimizer, scheduler, RNG and data position)", t.resume)
    trainer.train(resume_from_checkpoint=t.resume)
    if eval_rows:
        trainer.evaluate()

    # The Trainer would also save the tokenizer in transformers-5 form; the exports copy the
    # source's own tokenizer files instead, which the official code can read.
    trainer.processing_class = None
    final = output / "model"
    if t.method == "lora":
        adapter = output / "adapter"
        _save(trainer, adapter)
        if t.merge and trainer.is_world_process_zero():
            unset_hf_deepspeed_config()  # ZeRO-3 is over: the merge loads a whole, plain base model
            merge_lora(source, adapter, final)
        trainer.accelerator.wait_for_everyone()
        return final if t.merge else adapter
    if not ds_config and t.precision != "fp32":
        trainer.model.to(DTYPES[t.precision])  # fp32 master weights -> the checkpoint dtype
    _save(trainer, final, companions=[p for p in (source, tok_dir) if p is not None],
          generation_ids=None if generation else _generation_ids(chat, tokenizer))
    return final


def _save(trainer: SFTTrainer, final: Path, companions: list[Path] | None = None,
          generation_ids: dict[str, int] | None = None) -> None:
    """``trainer.save_model`` (every rank: ZeRO-3 gathers) into a temp folder, then publish on rank 0."""
    tmp = temp_dir(final)
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a Trainer pickle, not part of a checkpoint
        for folder in dict.fromkeys(companions or []):
            copy_companions(folder, tmp)
        if generation_ids is not None:
            write_generation_config(tmp, generation_ids)
        publish(tmp, final)
        log.info("wrote %s", final)
    trainer.accelerator.wait_for_everyone()


def _generation_ids(chat: ChatFormat, tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": chat.end_id, "pad_token_id": tokenizer.pad_token_id,
            "user_token_id": chat.user_id, "bot_token_id": chat.bot_id}
