"""The jobs' ``telechat`` sub-commands (registered as ``telechat.commands`` entry points)."""

from telechat.commands import Command

FINETUNE = Command("jobs.finetune.cli:main", "LoRA or full supervised fine-tuning", 50)
MERGE_LORA = Command("jobs.finetune.merge:main", "merge a LoRA adapter into its base model", 51)
QUANTIZE = Command("jobs.quant.cli:main", "GPTQ int4/int8 or FP8 quantization", 52)
