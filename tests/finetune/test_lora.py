"""A short LoRA run learns, and its merged checkpoint equals base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.finetune import merge
from jobs.finetune.cli import main
from jobs.finetune.dataset import encode
from telechat.chat_format import ChatFormat
from telechat.checkpoint import load_model
from telechat.tokenizer import load_tokenizer
from tests.finetune.conftest import log_history, step_losses

DIALOGS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "user", "content": "What is TeleChat?"}, {"role": "assistant", "content": "A chat model."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """Output folder of a 40-step LoRA run on a small repeated dataset (in-process)."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "repeated.jsonl"
    data.write_text("".join(json.dumps({"messages": d}, ensure_ascii=False) + "\n" for d in DIALOGS * 8),
                    encoding="utf-8")
    out = root / "out"
    code = main(["--method", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "40", "--lr", "5e-3", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0",
                 "--warmup", "2", "--batch-size", "2", "--max-seq-len", "64", "--logging-steps", "1",
                 "--save-steps", "40", "--eval-split", "0.1", "--seed", "3"])
    assert code == 0
    return out


def dialog_loss(model_dir: Path) -> float:
    """Mean answer-token loss of a checkpoint over the (distinct) training dialogs."""
    chat = ChatFormat(load_tokenizer(model_dir), json.loads((model_dir / "generation_config.json").read_text()))
    model = load_model(model_dir, device="cpu", dtype="float32")
    total = count = 0
    with torch.no_grad():
        for dialog in DIALOGS:
            sample, _ = encode(chat, dialog)
            labels = torch.tensor([sample.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([sample.input_ids]), labels=labels).loss.item() * n
            count += n
    return total / count


def test_short_lora_run_lowers_the_loss(lora_run: Path, tiny_model_dir: Path):
    history = log_history(lora_run / "checkpoint-40")
    losses = list(step_losses(history).values())
    assert len(losses) == 40
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6, losses
    # Batch-to-batch noise aside, the trained model fits the data clearly better than the base.
    assert dialog_loss(lora_run / "model") < dialog_loss(tiny_model_dir) - 0.5
    logged = set().union(*history)
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss", "eval_perplexity"} <= logged
    assert list((lora_run / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log"


def test_outputs_are_adapter_and_merged_checkpoint(lora_run: Path, tiny_model_dir: Path):
    adapter, model = lora_run / "adapter", lora_run / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model / name).is_file(), name
    assert (model / "generation_config.json").read_text() == (tiny_model_dir / "generation_config.json").read_text()
    assert not (model / "training_args.bin").exists()
    assert not list(lora_run.glob(".*.tmp")), "a temp folder was left behind"
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.0.self_attention.key_value.weight" in keys
    assert not any("lora" in k or "base_layer" in k for k in keys)


def test_merged_logits_equal_base_plus_adapter(lora_run: Path, tiny_model_dir: Path, tmp_path: Path):
    """Merging is exact (fp32): the exported model and merge-lora's both match PEFT's unmerged forward."""
    from peft import PeftModel

    ids = torch.tensor([[4, 10, 20, 30, 5, 40, 50, 2, 4, 60]])
    unmerged = PeftModel.from_pretrained(load_model(tiny_model_dir, device="cpu", dtype="float32"), lora_run / "adapter")
    with torch.no_grad():
        reference = unmerged(input_ids=ids).logits
        merged = load_model(lora_run / "model", device="cpu")
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)
        base = load_model(tiny_model_dir, device="cpu")
        assert not torch.allclose(base(input_ids=ids).logits, reference, atol=1e-3), "the adapter changed nothing"
    assert merge.main(["--adapter", str(lora_run / "adapter"), "--output", str(tmp_path / "m")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m", device="cpu")(input_ids=ids).logits, reference,
                                   atol=1e-5, rtol=1e-5)
