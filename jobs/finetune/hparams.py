"""Fine-tuning hyper-parameters: one dataclass per concern, the ``help`` of each field is the docs.

Every field becomes a ``--dashed-name`` option of ``telechat finetune`` and a YAML key of
``--config`` (underscored or dashed). Defaults are chosen to run as-is on a CPU box (fp32) and on
a GPU (bf16); cross-field rules live in :mod:`jobs.finetune.parser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_LORA_TARGETS = "query,key_value,dense,gate_proj,up_proj,down_proj"
"""Every linear layer of a TeleChat block (attention and MLP)."""


@dataclass
class ModelArguments:
    """Which weights to start from."""

    model: str | None = field(default=None, metadata={
        "help": "TeleChat checkpoint folder to fine-tune (config.json + weights + tokenizer)."})
    from_scratch: str | None = field(default=None, metadata={
        "help": "Random init instead of --model: a preset name (7B, 12B, 1B) or a config.json path. "
                "Needs --tokenizer and --method full."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer folder (default: the --model folder). Required with --from-scratch."})
    hidden_size: int | None = field(default=None, metadata={
        "help": "--from-scratch only: override hidden size (small experiments)."})
    layers: int | None = field(default=None, metadata={
        "help": "--from-scratch only: override the number of layers."})
    heads: int | None = field(default=None, metadata={
        "help": "--from-scratch only: override the number of attention heads."})
    ffn: int | None = field(default=None, metadata={
        "help": "--from-scratch only: override the MLP (ffn_hidden_size) width."})
    vocab_size: int | None = field(default=None, metadata={
        "help": "--from-scratch only: override the vocabulary size (must hold the tokenizer)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, ~30%% more compute."})


@dataclass
class DataArguments:
    """Where the conversations come from and how they become training rows."""

    data: str | None = field(default=None, metadata={
        "help": "Training data: a jsonl file (official {input, output} or OpenAI {messages}) or a "
                "data.json mapping jsonl paths to sampling weights (official format)."})
    max_seq_len: int = field(default=2048, metadata={
        "help": "Tokens per training row; longer conversations are cut (see --overlong)."})
    packing: bool = field(default=True, metadata={
        "help": "Pack several short conversations into one row; position ids restart per "
                "conversation and attention never crosses conversations."})
    overlong: str = field(default="truncate", metadata={
        "help": "Conversations longer than --max-seq-len: 'truncate' keeps the leading turns that "
                "fit (cutting the first answer if needed), 'drop' skips them. Counts are logged.",
        "choices": ("truncate", "drop")})
    eval_split: float = field(default=0.0, metadata={
        "help": "Fraction of conversations held out for eval loss / perplexity (0 = no eval)."})


@dataclass
class LoraArguments:
    """PEFT LoRA adapter settings (used with --method lora)."""

    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(default=DEFAULT_LORA_TARGETS, metadata={
        "help": "Comma-separated module names to adapt."})


@dataclass
class TrainArguments:
    """Optimisation, parallelism, precision and output."""

    method: str = field(default="lora", metadata={
        "help": "lora: train a PEFT adapter and also export a merged checkpoint; full: train all weights.",
        "choices": ("lora", "full")})
    output: str | None = field(default=None, metadata={
        "help": "Output folder (new or empty): run_config.yaml (the run's options), checkpoint-N/ "
                "(resumable), runs/ (TensorBoard), model/ (final checkpoint in official naming) and, for "
                "LoRA, adapter/."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(default=-1, metadata={
        "help": "Stop after this many optimizer steps (overrides --epochs when > 0)."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate (default: 2e-4 for LoRA, 3e-5 for full)."})
    scheduler: str = field(default="cosine", metadata={
        "help": "Learning-rate schedule after warmup.",
        "choices": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")})
    warmup: float = field(default=0.03, metadata={
        "help": "Linear warmup: a fraction of all steps when < 1, else a number of steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    batch_size: int = field(default=1, metadata={"help": "Rows per device per micro-step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    precision: str = field(default="auto", metadata={
        "help": "auto = bf16 on a GPU that has it (else fp16), fp32 on CPU.",
        "choices": ("auto", "bf16", "fp16", "fp32")})
    backend: str = field(default="deepspeed", metadata={
        "help": "Full SFT sharding: deepspeed = DeepSpeed ZeRO as --zero/--deepspeed-config choose (--zero 0: "
                "plain data parallel; ZeRO-2/3 can --offload); fsdp = PyTorch FSDP2 (weights, grads and optimizer "
                "state sharded per decoder block, fp32 master weights, bf16 compute; faster than ZeRO-3 at equal "
                "batch; GPUs only, launch with torchrun; --method full only). See jobs/finetune/README.md.",
        "choices": ("deepspeed", "fsdp")})
    zero: int = field(default=0, metadata={
        "help": "DeepSpeed ZeRO stage from the configs shipped in jobs/finetune/ (0 = no DeepSpeed).",
        "choices": (0, 2, 3)})
    offload: bool = field(default=False, metadata={
        "help": "With --zero 2/3: keep optimizer states (and ZeRO-3 params) in CPU memory."})
    deepspeed_config: str | None = field(default=None, metadata={
        "help": "Use this DeepSpeed JSON instead of the shipped one chosen by --zero/--offload."})
    compile: str = field(default="auto", metadata={
        "help": "torch.compile each decoder block (fuses norms, RoPE, SwiGLU and the adds: the largest "
                "speed-up measured on H200, see bench/RESULTS.md). auto = on when training on a GPU (off on CPU, and in one process over several GPUs, where on is "
                "refused: use torchrun). The first steps take about a minute longer while it compiles.",
        "choices": ("auto", "on", "off")})
    loss_chunk_tokens: int = field(default=4096, metadata={
        "help": "Compute the training loss this many tokens at a time, never holding the whole [tokens, vocab] "
                "logits (GBs for TeleChat's 160k vocabulary; recomputed in backward, ~2%% more compute). "
                "0 = off (plain full logits). Evaluation is unaffected."})
    seed: int = field(default=42, metadata={"help": "Seed for data sampling, shuffling, init and dropout."})
    save_steps: int = field(default=500, metadata={
        "help": "Write a resumable checkpoint-N every this many optimizer steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep at most this many checkpoint-N folders."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate every this many steps (default: --save-steps); needs --eval-split."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, lr, grad norm and tokens/s every N steps."})
    resume: str | None = field(default=None, metadata={
        "help": "Continue the run in --output from its last complete checkpoint (bare --resume) or "
                "from the given checkpoint folder: weights, optimizer, scheduler and data position. Options "
                "not given come from OUTPUT/run_config.yaml; changing one that shapes the model or data is "
                "refused. A finished run is left as it is.",
        "nargs": "?", "const": "last"})
    overwrite: bool = field(default=False, metadata={
        "help": "Start a new run in a non-empty --output: its checkpoint-N/ are deleted, the files of "
                "model/ and adapter/ replaced, every other file kept."})
    merge: bool = field(default=True, metadata={
        "help": "LoRA: also export base+adapter merged into model/ (disable with --no-merge)."})


@dataclass
class FinetuneArguments:
    """All settings of one fine-tuning run, grouped by concern."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    train: TrainArguments

    @property
    def lora_targets(self) -> list[str]:
        """The ``--lora-targets`` module names as a list."""
        return [t.strip() for t in self.lora.lora_targets.split(",") if t.strip()]


GROUPS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "lora": LoraArguments,
    "train": TrainArguments,
}
"""``FinetuneArguments`` attribute → dataclass, in ``--help`` order."""
