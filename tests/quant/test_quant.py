"""GPTQ job end to end on CPU: quantize, report, load (ours + official AutoGPTQ layout), generate, serve."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.quant.conftest import quantize_args

PPL_BUDGET_PCT = {8: 2.0, 4: 10.0}


def _is_quantized_linear(module) -> bool:
    return not isinstance(module, torch.nn.Linear) and hasattr(module, "qweight")


@pytest.mark.parametrize("bits", [8, 4])
def test_perplexity_within_budget(quantized, trained_model: Path, bits: int):
    """The report holds both perplexities; the rise stays within 2% (int8) / 10% (int4)."""
    out = quantized(bits)
    report = json.loads((out / "quant_report.json").read_text())
    assert (out / "quant_report.md").read_text().count("|") > 10
    vocab = json.loads((trained_model / "config.json").read_text())["vocab_size"]
    assert report["ppl_original"] < vocab / 4, "the test model did not learn; perplexity would mean nothing"
    assert report["ppl_change_pct"] <= PPL_BUDGET_PCT[bits], report


def test_output_layout(quantized, trained_model: Path):
    """config.json carries quantization_config, quantize_config.json exists, tokenizer and
    generation config are copied verbatim, no temporary folder is left behind."""
    out = quantized(4)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["group_size"] == 128
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (trained_model / name).read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bits", [8, 4])
def test_load_model_generates_and_engine_matches(quantized, bits: int):
    """telechat.model.checkpoint.load_model returns quantized Linears (lm_head dense); greedy decoding
    through generate() and through the serving engine give the same tokens."""
    from telechat.model.loader import load_model
    from telechat.engine.core import LLMEngine
    from telechat.engine.sampling import SamplingParams

    model = load_model(quantized(bits), device="cpu")
    block = model.transformer.h[0]
    assert all(_is_quantized_linear(m) for m in (block.self_attention.query, block.self_attention.key_value,
                                                   block.self_attention.dense, block.mlp.down_proj))
    assert isinstance(model.lm_head, torch.nn.Linear)
    prompt = [10, 20, 30, 40, 50]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 5:].tolist()
    engine = LLMEngine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    assert len(engine) == 8
    assert engine == hf


def _write_official_layout(src: Path, dst: Path) -> None:
    """Rewrite one of our int4 outputs as the official TeleChat-7B int4 release stores it (docs/fine-tune-and-quant.md):
    config.json without quantization_config, AutoGPTQ quantize_config.json, one torch.save
    ``gptq_model-4bit-128g.bin``, 7B keys (no ``transformer.``, no lm_head), a zero bias on every
    quantized Linear, fp16 embeddings."""
    from safetensors.torch import load_file

    dst.mkdir()
    tensors = {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("transformer.")
        tensors[name] = t.half() if t.is_floating_point() else t
        if name.endswith(".qweight"):
            tensors.setdefault(name.replace(".qweight", ".bias"), torch.zeros(t.shape[1], dtype=torch.float16))
    torch.save(tensors, dst / "gptq_model-4bit-128g.bin")
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "quantize_config.json").write_text(json.dumps({
        "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_official_autogptq_layout_loads_and_generates(quantized, tmp_path: Path):
    """The official layout gives the same logits as our layout (after the fp16 embedding cast) and generates."""
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model
    from telechat.engine.core import LLMEngine
    from telechat.engine.sampling import SamplingParams

    ours = quantized(4)
    official = tmp_path / "7B_4bit"
    _write_official_layout(ours, official)
    assert inspect_checkpoint(official).quantized
    a = load_model(ours, device="cpu", dtype="float32")
    b = load_model(official, device="cpu", dtype="float32")
    assert _is_quantized_linear(b.transformer.h[1].mlp.up_proj)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(la, lb, atol=2e-2, rtol=1e-2)
    out = LLMEngine(b).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out) == 8


def test_too_little_calibration_data_fails_clearly(trained_model: Path, sft_file: Path, tmp_path: Path, caplog):
    """Fewer usable records than --calib-samples: exit code 2, a message naming the fix, no output."""
    from jobs.quant.cli import main

    small = tmp_path / "few.jsonl"
    small.write_text("".join(sft_file.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    out = tmp_path / "never"
    assert main(quantize_args(trained_model, small, out, 4)) == 2
    assert "fewer than the 64 requested" in caplog.text and "--calib-samples" in caplog.text
    assert not out.exists()


def test_finetune_refuses_a_quantized_checkpoint(quantized, sft_file: Path, tmp_path: Path, caplog):
    """Fine-tuning a GPTQ folder: one line saying to fine-tune the bf16 checkpoint, then quantize."""
    from jobs.finetune.cli import main

    with caplog.at_level(logging.ERROR):
        assert main(["--model", str(quantized(4)), "--data", str(sft_file), "--output", str(tmp_path / "o")]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "is a quantized (GPTQ) checkpoint" in message and "fine-tune the bf16/fp16 checkpoint" in message
    assert "\n" not in message and not (tmp_path / "o").exists()


def _killed_job_leftovers(*parents: Path) -> list[Path]:
    """Scratch folders made by a job process that was then SIGKILLed (a fork of this one)."""
    from jobs.output import owned_temp_dir

    pid = os.fork()
    if pid == 0:  # the doomed job
        for parent in parents:
            owned_temp_dir(parent, "killed")
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    leftovers = [p for parent in parents for p in parent.iterdir() if p.name.startswith(".telechat-tmp-")]
    assert len(leftovers) == len(parents)
    return leftovers


def test_defaults_quantize_the_demo_model_quietly_and_clean_up(demo_model_dir: Path, sft_file: Path,
                                                               tmp_path: Path, caplog):
    """`telechat quantize` with the default group size works on the demo model (ffn 352): it picks
    32 and says so. It refuses an existing non-empty output without --overwrite and with it keeps
    the user's files; its log is short; GPTQModel leaves nothing behind (no /tmp/gptqmodel_*, no
    logs/ in the working directory); folders left by a killed job are removed; modes follow the umask."""
    from jobs.quant.cli import main

    out = tmp_path / "demo-int4"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    leftovers = _killed_job_leftovers(tmp_path, tmpdir)
    argv = ["quantize", "--model", str(demo_model_dir), "--calib", str(sft_file), "--device", "cpu",
            "--output", str(out), "--calib-samples", "32", "--calib-seq-len", "256", "--eval-max-tokens", "2048"]
    with caplog.at_level(logging.ERROR):
        assert main(argv[1:]) == 2
    assert f"--output {out} exists and is not empty; pass --overwrite" in caplog.text

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "telechat.cli", *argv, "--overwrite"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, umask=0o027)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "--group-size 32: the largest that divides every Linear input width" in log
    assert len(log.splitlines()) < 40 and "GPT-QModel" not in log, log
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "quant_report.json").is_file()
    assert {p.stat().st_mode & 0o777 for p in out.iterdir() if p.name != "NOTES.txt"} == {0o640}
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-int4", "tmp"]  # no logs/, no staging folder
    assert not [p.name for p in tmpdir.iterdir() if p.name.startswith(("gptqmodel_", ".telechat-tmp-"))]
