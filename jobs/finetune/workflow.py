"""``run_sft``: the fine-tuning recipe, tokenizer → data → model → collator → trainer → export."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from jobs.finetune.data import load_conversations
from jobs.finetune.dataset import Collator, RowDataset, build_rows, encode_all
from jobs.finetune.export import export_checkpoint
from jobs.finetune.hparams import FinetuneArguments
from jobs.finetune.merge import merge_lora, record_base
from jobs.finetune.model_setup import build_model, model_config
from jobs.finetune.parser import ArgsError, last_checkpoint
from jobs.finetune.run_config import save_run_config, training_done
from jobs.finetune.trainer import SFTTrainer
from jobs.output import staged
from jobs.quiet import rank
from telechat.chat_format import ChatFormat
from telechat.model.checkpoint import DTYPES
from telechat.model.loader import load_model
from telechat.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent
FSDP_SHARDS = "pytorch_model_fsdp_0"
"""Where accelerate writes a sharded FSDP model inside ``checkpoint-N``."""
ADAM_BETAS = (0.9, 0.95)  # the official TeleChat fine-tuning betas (docs/fine-tune-and-quant.md)


def deepspeed_config(args: FinetuneArguments) -> str | None:
    """The DeepSpeed JSON for ``--zero``/``--offload`` (or ``--deepspeed-config``); None without DeepSpeed."""
    t = args.train
    if t.deepspeed_config:
        return t.deepspeed_config
    if t.zero == 0:
        return None
    return str(CONFIG_DIR / f"ds_zero{t.zero}{'_offload' if t.offload else ''}.json")


def fsdp_config(args: FinetuneArguments) -> dict | None:
    """The Trainer's ``fsdp_config`` for ``--backend fsdp`` (FSDP2 through accelerate); None otherwise.

    The model comes already sharded (:func:`jobs.finetune.model_setup.shard_fsdp2`); the Trainer
    and accelerate save and load its sharded checkpoints (each rank writes its part) and gather
    the full state dict for the export.
    """
    if args.train.backend != "fsdp":
        return None
    return {"version": 2, "auto_wrap_policy": "NO_WRAP", "state_dict_type": "SHARDED_STATE_DICT"}


def single_process_rendezvous() -> None:
    """Run without a launcher: a one-process group (DeepSpeed would otherwise attempt MPI
    discovery, and the Trainer runs FSDP only in a distributed setting)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_deepspeed_distributed() -> None:
    """Start DeepSpeed's process group before the model exists (ZeRO-3 partitions weights at init
    and sizes its batch from DeepSpeed's own world size)."""
    import deepspeed

    single_process_rendezvous()
    deepspeed.init_distributed()


def training_arguments(args: FinetuneArguments, ds_config: str | None, has_eval: bool) -> TrainingArguments:
    """Map our options onto ``transformers.TrainingArguments``."""
    t = args.train
    fsdp = fsdp_config(args)
    targs = TrainingArguments(
        output_dir=t.output, seed=t.seed, use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        deepspeed=ds_config, fsdp=fsdp is not None, fsdp_config=fsdp,
        **_checkpointing(args.model.gradient_checkpointing),
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps,
        logging_steps=t.logging_steps, logging_first_step=True, report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
    )
    if fsdp is not None:
        targs.device  # noqa: B018  (starts the process group and picks this rank's GPU: sharding needs both)
    return targs


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
    for LoRA with ``--no-merge``). A resumed run whose training is over only exports what is missing."""
    t, m, d = args.train, args.model, args.data
    set_seed(t.seed)
    source = Path(m.model) if m.model else None
    tok_dir = Path(m.tokenizer) if m.tokenizer else source
    tokenizer = load_tokenizer(tok_dir)
    gen_file = (source or tok_dir) / "generation_config.json"
    generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
    chat = ChatFormat(tokenizer, generation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = chat.end_id  # the Trainer counts tokens != pad as real ones
    export = Export(args, companions=[p for p in (source, tok_dir) if p is not None],
                    generation_ids=None if generation else _generation_ids(chat, tokenizer),
                    config=lambda: model_config(args, tokenizer))
    if t.resume and training_done(Path(t.resume), t):
        return export.finished_run(Path(t.resume))

    train, held_out = load_conversations(d.data, t.seed, d.eval_split)
    train_rows = build_rows(encode_all(chat, train, d.max_seq_len, d.overlong), d.max_seq_len, d.packing)
    random.Random(t.seed).shuffle(train_rows)
    eval_rows = (build_rows(encode_all(chat, held_out, d.max_seq_len, d.overlong), d.max_seq_len, d.packing)
                 if held_out else None)

    ds_config = deepspeed_config(args)
    if ds_config:
        if rank() == 0:
            log.info("DeepSpeed compiles its C++/CUDA ops on first use: up to ~2 min without output "
                     "(cached in %s)", os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"))
        init_deepspeed_distributed()
    elif t.backend == "fsdp":
        single_process_rendezvous()
    # Created before the model: with ZeRO-3 it switches model creation to partitioned init.
    targs = training_arguments(args, ds_config, has_eval=eval_rows is not None)
    model = build_model(args, tokenizer, zero3=is_deepspeed_zero3_enabled())
    trainer = SFTTrainer(
        model=model, args=targs, data_collator=Collator(tokenizer.pad_token_id), train_dataset=RowDataset(train_rows),
        eval_dataset=RowDataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
    )
    if rank() == 0:
        _prepare_output(args)  # only now: bad data or a bad model leaves --output as it was
    if t.resume:
        log.info("resuming from %s (weights, optimizer, scheduler, RNG and data position)", t.resume)
    trainer.train(resume_from_checkpoint=t.resume)
    if eval_rows:
        trainer.evaluate()

    state = _gathered_state_dict(trainer)  # every rank takes part (ZeRO-3 gathers)
    if trainer.is_world_process_zero():
        unset_hf_deepspeed_config()  # training is over: the merge loads a whole, plain base model
        export.trained_model(trainer.accelerator.unwrap_model(trainer.model), state)
    trainer.accelerator.wait_for_everyone()
    return export.final


def _prepare_output(args: FinetuneArguments) -> None:
    """Rank 0, before training: ``--overwrite`` removes the previous run's checkpoint-N (``--resume``
    would take a stale, higher-numbered one for this run's newest); the run's options are saved."""
    output = Path(args.train.output)
    if args.train.overwrite:
        while (old := last_checkpoint(output, complete_only=False)) is not None:
            shutil.rmtree(old)
    save_run_config(args, output)


def _gathered_state_dict(trainer: SFTTrainer) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, however it is sharded (collective: call on every rank)."""
    try:
        return trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    except ValueError as e:  # a ZeRO-3 config of the user's that keeps weights sharded on save
        raise ArgsError(f"cannot gather the ZeRO-3 weights to export them ({e}); set "
                        "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config") from e


class Export:
    """The final folders of a run: ``adapter/`` (LoRA) and ``model/`` (full, or LoRA merged)."""

    def __init__(self, args: FinetuneArguments, companions: list[Path], generation_ids: dict[str, int] | None,
                 config: Callable[[], Any]):
        self.args, self.companions, self.generation_ids, self.config = args, companions, generation_ids, config
        self.output = Path(args.train.output)
        self.lora = args.train.method == "lora"
        self.merge = not self.lora or args.train.merge
        self.final = self.output / ("model" if self.merge else "adapter")

    def trained_model(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Export the just-trained ``model`` (unwrapped) from its gathered ``state`` (rank 0)."""
        if self.lora:
            with staged(self.output / "adapter") as tmp:
                model.save_pretrained(tmp, state_dict=state)  # PEFT keeps the adapter's tensors
                record_base(tmp, Path(self.args.model.model), self.output / "adapter")
            self._merge()
        else:
            self._full(state, model.config)

    def finished_run(self, checkpoint: Path) -> Path:
        """A resumed run whose training is over: write the final folders that are missing from its
        last checkpoint, without training or touching checkpoints."""
        wanted = [self.output / "adapter"] * self.lora + [self.output / "model"] * self.merge
        if all(p.is_dir() for p in wanted):
            log.info("the run in %s is already complete (%s is its last step): nothing to do", self.output, checkpoint.name)
            return self.final
        if rank() == 0:
            log.info("training is over (%s is the last step): exporting it", checkpoint.name)
            if self.lora:
                with staged(self.output / "adapter") as tmp:
                    for name in ("adapter_config.json", "adapter_model.safetensors"):
                        shutil.copy2(checkpoint / name, tmp / name)
                    record_base(tmp, Path(self.args.model.model), self.output / "adapter")
                self._merge()
            elif (checkpoint / FSDP_SHARDS).is_dir():
                config = self.config()
                self._full(load_fsdp_shards(checkpoint / FSDP_SHARDS, config), config)
            else:
                model = load_model(checkpoint, device="cpu", dtype="float32")
                self._full(model.state_dict(), model.config)
        return self.final

    def _merge(self) -> None:
        if self.merge:
            merge_lora(self.args.model.model, self.output / "adapter", self.output / "model")

    def _full(self, state: dict[str, torch.Tensor], config) -> None:
        export_checkpoint(state, config, self.output / "model", dtype=DTYPES[self.args.train.precision],
                          companions=self.companions, generation_ids=self.generation_ids)


def load_fsdp_shards(folder: Path, config) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of an FSDP checkpoint's sharded weights (``checkpoint-N/pytorch_model_fsdp_0``,
    torch.distributed.checkpoint as accelerate writes it), read in this one process."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(folder))  # fills the tensors in place
    return state


def _generation_ids(chat: ChatFormat, tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": chat.end_id, "pad_token_id": tokenizer.pad_token_id,
            "user_token_id": chat.user_id, "bot_token_id": chat.bot_id}
