"""TeleChat fine-tuning job: LoRA (PEFT) and full SFT (DeepSpeed ZeRO-2/3) on the HF Trainer.

Entry points: ``telechat finetune`` → :func:`jobs.finetune.cli.main`, ``telechat merge-lora`` →
:func:`jobs.finetune.merge.main`; the recipe itself is :func:`jobs.finetune.workflow.run_sft`.
"""
