"""Full SFT with --backend fsdp (FSDP2 through the Trainer/accelerate) on 2 GPUs: trains with compiled
blocks and the chunked loss, writes sharded checkpoints, exports the same format as the DeepSpeed path,
and a finished run without its export re-exports the same bytes from the sharded checkpoint.

Needs 2 CUDA devices: accelerate runs FSDP on accelerators only (a CPU job is refused, see
test_speed.py), so CI (CPU) skips this; it ran on 2 x H200 (see jobs/finetune/README.md).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.finetune.conftest import log_history, run_cli, step_losses
from tests.finetune.test_lora import tensor_names

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs")]


def _data(path: Path, n: int = 64) -> Path:
    """Synthetic official-format conversations (the GPU box has no shared/ reference data)."""
    lines = [json.dumps({"input": f"<_user>what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}. " * (1 + i % 5)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fsdp_two_gpus(tmp_path: Path, tiny_model_dir: Path):
    data = _data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    torchrun = [str(Path(sys.executable).with_name("torchrun")) if Path(sys.executable).with_name("torchrun").exists()
                else "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())]
    args = ["--method", "full", "--backend", "fsdp", "--model", str(tiny_model_dir), "--data", str(data),
            "--max-steps", "6", "--save-steps", "3", "--logging-steps", "1", "--max-seq-len", "128",
            "--batch-size", "2", "--eval-split", "0.1", "--lr", "1e-3", "--loss-chunk-tokens", "64"]
    done = run_cli(*args, "--output", str(out), launcher=torchrun, timeout=500)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "compiling the 2 decoder blocks" in log  # --compile auto = on with CUDA
    assert "compile: 'on'" in (out / "run_config.yaml").read_text()
    assert "backend: fsdp" in (out / "run_config.yaml").read_text()
    expected = step_losses(log_history(out / "checkpoint-6"))
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert any("eval_loss" in h for h in log_history(out / "checkpoint-6"))
    assert (out / "checkpoint-6" / "pytorch_model_fsdp_0").is_dir()  # sharded (DCP) weights
    # the one export: tied head not stored (22 tensors, as the base and the ZeRO export), use_cache on
    assert tensor_names(out / "model") == tensor_names(tiny_model_dir)
    assert len(tensor_names(out / "model")) == 22
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True
    from telechat.model.loader import load_model

    model, base = load_model(out / "model", device="cpu"), load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[4, 10, 20, 30, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits), "weights did not change"

    # killed between the last checkpoint and the export: --resume exports the sharded checkpoint alone
    exported = (out / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "model")
    again = run_cli("--output", str(out), "--resume", launcher=torchrun, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "training is over (checkpoint-6 is the last step): exporting it" in again.stdout + again.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == exported

    # resume from the middle checkpoint: FSDP's sharded model + optimizer state load back
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "model")
    resumed = run_cli("--output", str(out), "--resume", launcher=torchrun, timeout=500)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming from {out / 'checkpoint-3'}" in resumed.stdout + resumed.stderr
    got = step_losses(log_history(out / "checkpoint-6"))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # bf16 compute: close, not bit-equal
        assert got[step] == pytest.approx(expected[step], rel=2e-2), (step, got[step], expected[step])
    assert (out / "model" / "model.safetensors").is_file()
