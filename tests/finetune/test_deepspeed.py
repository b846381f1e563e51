"""Full SFT with DeepSpeed ZeRO-2 across 2 processes (torchrun, gloo on CPU) trains and exports."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from telechat.model.loader import load_model
from tests.conftest import free_port
from tests.finetune.conftest import log_history, official_subset, run_cli, step_losses
from tests.finetune.test_lora import tensor_names

pytest.importorskip("deepspeed")


def test_zero2_two_processes(tmp_path: Path, tiny_model_dir: Path, official_sft):
    """Two ranks, ZeRO-2: steps run, losses are logged, the full checkpoint is gathered and loads.

    The first DeepSpeed run on a machine JIT-builds its shm_comm op (~20 s, cached in
    ``$TORCH_EXTENSIONS_DIR``); no optimizer op is built because the shipped config has no
    ``optimizer`` block.
    """
    data = official_subset(official_sft, tmp_path / "data.jsonl", 16, 8)
    out = tmp_path / "out"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    assert shutil.which(torchrun[0]), "torchrun not found next to the python executable"
    done = run_cli("--method", "full", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                   "--zero", "2", "--max-steps", "4", "--save-steps", "4", "--logging-steps", "1",
                   "--max-seq-len", "128", "--lr", "1e-3", launcher=torchrun, timeout=420, umask=0o027)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    log = done.stdout + done.stderr
    assert "DeepSpeed compiles its C++/CUDA ops on first use" in log  # the silent build is announced
    assert log.count("tokenizing: 100%") == 1 and log.count("--max-seq-len 128:") == 1  # rank 0 only
    assert "FutureWarning" not in log
    state = log_history(out / "checkpoint-4")
    assert sorted(step_losses(state)) == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own (sharded) optimizer state
    assert len(list((out / "checkpoint-4" / "global_step4").glob("*optim_states.pt"))) == 2
    # the one export: tied head not stored (22 tensors, as the base), use_cache back on, umask modes
    assert tensor_names(out / "model") == tensor_names(tiny_model_dir)
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True
    assert (out / "model").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (out / "model").iterdir()} == {0o640}
    model = load_model(out / "model", device="cpu")
    base = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[4, 10, 20, 30, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits), "weights did not change"
