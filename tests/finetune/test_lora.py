"""A short LoRA run learns, and its merged checkpoint equals base + adapter."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.finetune import merge
from jobs.finetune.cli import main
from jobs.finetune.dataset import encode
from telechat.chat_format import ChatFormat
from telechat.model.loader import load_model
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
    cwd = os.getcwd()
    os.chdir(tiny_model_dir.parent)  # --model as typed relative to here, the way a user passes it
    try:
        code = main(["--method", "lora", "--model", tiny_model_dir.name, "--data", str(data), "--output", str(out),
                     "--max-steps", "40", "--lr", "5e-3", "--lora-rank", "8", "--lora-alpha", "16",
                     "--lora-dropout", "0", "--warmup", "2", "--batch-size", "2", "--max-seq-len", "64",
                     "--logging-steps", "1", "--save-steps", "40", "--eval-split", "0.1", "--seed", "3"])
    finally:
        os.chdir(cwd)
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
    assert not list(lora_run.glob(".*")), "a temp folder was left behind"
    assert tensor_names(model) == tensor_names(tiny_model_dir)  # tied head not stored: 22 tensors, as the base
    assert json.loads((model / "config.json").read_text())["use_cache"] is True
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_model_dir.resolve())  # absolute, though --model was typed relative


def tensor_names(folder: Path) -> set[str]:
    """Tensor names of a checkpoint's model.safetensors."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


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


def test_merge_lora_never_clobbers_an_existing_folder(lora_run: Path, tiny_model_dir: Path, tmp_path: Path, caplog):
    """merge-lora into the base's own copy: refused without --overwrite; with it, the merged files
    replace theirs and the user's other files stay; modes follow the umask."""
    b2 = tmp_path / "b2"
    shutil.copytree(tiny_model_dir, b2)
    (b2 / "README.md").write_text("my model card")
    (b2 / "NOTES.txt").write_text("my notes")
    before = (b2 / "model.safetensors").read_bytes()
    argv = ["--adapter", str(lora_run / "adapter"), "--base", str(b2), "--output", str(b2)]
    with caplog.at_level(logging.ERROR):
        assert merge.main(argv) == 2
    assert f"--output {b2} exists and is not empty; pass --overwrite" in caplog.text
    assert (b2 / "model.safetensors").read_bytes() == before
    umask = os.umask(0o027)
    try:
        assert merge.main(argv + ["--overwrite"]) == 0
    finally:
        os.umask(umask)
    assert (b2 / "README.md").read_text() == "my model card" and (b2 / "NOTES.txt").read_text() == "my notes"
    assert (b2 / "model.safetensors").read_bytes() == (lora_run / "model" / "model.safetensors").read_bytes()
    assert (b2 / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_lora_elsewhere_without_the_base_says_pass_base(lora_run: Path, tmp_path: Path, caplog):
    """An adapter whose recorded base is not on this machine: one line telling to pass --base."""
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base"}))
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "the base model base named in" in message and "pass --base FOLDER" in message and "\n" not in message
    assert not (tmp_path / "m").exists()


def test_adapter_finds_its_base_where_the_pair_is_mounted(lora_run: Path, tiny_model_dir: Path, tmp_path: Path):
    """Adapter and base moved together (host ./models vs /models in the containers): the recorded
    absolute base is gone, the path relative to the adapter still finds it."""
    relative = json.loads((lora_run / "adapter" / merge.BASE_RECORD).read_text())["relative_to_adapter"]
    assert not Path(relative).is_absolute()
    mount = tmp_path / "mnt"
    adapter = mount / lora_run.relative_to(lora_run.anchor) / "adapter"  # deep enough for every '..'
    shutil.copytree(lora_run / "adapter", adapter)
    base = (adapter / relative).resolve()
    assert base.is_relative_to(mount)
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    assert merge.adapter_base(adapter) == base
    assert merge.main(["--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_the_adapter_serves_per_request_like_the_merged_model(lora_run: Path, tiny_model_dir: Path):
    """The job's adapter folder loads as it is for per-request serving (``telechat serve --lora-modules``):
    batched with a base request, its greedy tokens are the job's merged checkpoint's, the base's the base's."""
    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0)
    prompt = [4, 10, 20, 30, 5, 40, 50, 2, 4, 60]
    config = EngineConfig(max_num_seqs=4, max_loras=1, max_lora_rank=8, kv_cache_memory=16 << 20)
    engine = LLMEngine(load_model(tiny_model_dir, device="cpu", dtype="float32"), config)
    engine.load_adapter("sft", str(lora_run / "adapter"))
    ids = {engine.add_request(prompt, params, lora="sft"): "sft", engine.add_request(prompt, params): "base"}
    got: dict[str, list[int]] = {"sft": [], "base": []}
    while engine.has_unfinished():
        for out in engine.step():
            got[ids[out.request_id]] += out.new_token_ids

    def alone(folder: Path) -> list[int]:
        model = load_model(folder, device="cpu", dtype="float32")
        return LLMEngine(model, EngineConfig(max_num_seqs=2, kv_cache_memory=16 << 20)).generate([prompt], params)[0]

    assert got == {"sft": alone(lora_run / "model"), "base": alone(tiny_model_dir)}
    assert got["sft"] != got["base"], "the adapter should change the tokens"
