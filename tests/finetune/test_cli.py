"""End to end through the command line: official data in, a merged checkpoint out that loads and generates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.finetune.cli import main
from telechat.chat_format import ChatFormat
from telechat.model.loader import load_model
from telechat.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.finetune.conftest import child_env, official_subset, run_cli

SCRIPTS = REPO / "jobs" / "finetune"


def generate_reply(model_dir: Path) -> list[int]:
    """Greedy-decode a few tokens for one question with the checkpoint's own chat format."""
    gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    chat = ChatFormat(load_tokenizer(model_dir), gen)
    model = load_model(model_dir, device="cpu")
    prompt = torch.tensor([chat.encode_prompt([{"role": "user", "content": "你好"}])])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=chat.stop_token_ids)
    return out[0, prompt.shape[1]:].tolist()


def test_python_m_lora_on_official_jsonl_to_merged_checkpoint(tmp_path: Path, tiny_model_dir: Path, official_sft):
    data = official_subset(official_sft, tmp_path / "official.jsonl", 12, 6)
    out = tmp_path / "out"
    done = run_cli("--method", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                   "--max-steps", "4", "--max-seq-len", "128", "--save-steps", "2", "--eval-split", "0.2")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "eval_perplexity" in done.stdout + done.stderr
    assert "GPT-QModel" not in done.stdout + done.stderr  # PEFT imports it; its banner stays out of the log
    merged = out / "model"
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["TelechatForCausalLM"]
    assert generate_reply(merged), "the merged model generated nothing"


@pytest.mark.parametrize("source", ["preset", "config.json"])
def test_from_scratch_small_model(tmp_path: Path, tiny_model_dir: Path, official_sft, source: str):
    """Random init from a preset (resized) or a config.json (+ override); exported with the tokenizer."""
    data = official_subset(official_sft, tmp_path / "official.jsonl", 8, 0)
    vocab = len(load_tokenizer(tiny_model_dir))
    scratch = (["--from-scratch", "7B", "--hidden-size", "32", "--heads", "2", "--ffn", "64", "--layers", "1",
                "--vocab-size", str(vocab)] if source == "preset"
               else ["--from-scratch", str(tiny_model_dir / "config.json"), "--layers", "1"])
    out = tmp_path / "out"
    assert main(["--method", "full", *scratch, "--tokenizer", str(tiny_model_dir), "--data", str(data),
                 "--output", str(out), "--max-steps", "2", "--max-seq-len", "64"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["n_layer"] == 1 and config["vocab_size"] == vocab
    assert config["hidden_size"] == (32 if source == "preset" else 64)
    assert config["use_cache"] is True  # off while training only
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "generation_config.json").is_file()
    assert generate_reply(out / "model")


def test_run_lora_sh_takes_paths_relative_to_the_caller(tmp_path: Path, tiny_model_dir: Path, official_sft):
    """The launcher scripts run where they are called from: relative MODEL, DATA and OUTPUT work."""
    official_subset(official_sft, tmp_path / "data.jsonl", 4, 0)
    (tmp_path / "base").symlink_to(tiny_model_dir)
    done = subprocess.run([str(SCRIPTS / "run_lora.sh"), "base", "data.jsonl", "out", "--max-steps", "1",
                           "--max-seq-len", "64", "--no-gradient-checkpointing", "--no-merge"],
                          cwd=tmp_path, env={**child_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_run_single_node_sh_without_nvidia_smi_says_why(tmp_path: Path):
    """No nvidia-smi and no NGPUS: exit code 2 and one line naming NGPUS, not a silent 127."""
    bin_dir = tmp_path / "bin"  # a PATH with the shell and nothing else, as on a host without the NVIDIA driver
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    env = {**child_env(), "PATH": str(bin_dir)}
    env.pop("NGPUS", None)
    done = subprocess.run([str(SCRIPTS / "run_single_node.sh"), "m", "d", "o"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "set NGPUS=N" in done.stderr, done.stderr
