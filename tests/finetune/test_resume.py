"""Resume: after a hard kill the step count continues and the losses match an uninterrupted run;
run_config.yaml keeps the run's options; a finished run is left as it is."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.finetune.cli import EXIT_USAGE, main
from jobs.finetune.parser import last_checkpoint
from tests.conftest import REPO
from tests.finetune.conftest import child_env, log_history, official_subset, run_cli, step_losses

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory, official_sft) -> Path:
    return official_subset(official_sft, tmp_path_factory.mktemp("resume") / "data.jsonl", 40, 20)


@pytest.fixture(scope="module")
def common(tiny_model_dir: Path, data: Path) -> list[str]:
    # LoRA dropout stays on: resuming must restore the RNG too
    return ["--method", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", str(STEPS),
            "--save-steps", "3", "--logging-steps", "1", "--batch-size", "4", "--max-seq-len", "128",
            "--lr", "1e-3", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, common: list[str]) -> Path:
    """Output folder of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(common + ["--output", str(out)]) == 0
    return out


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, common: list[str], reference: Path):
    expected = step_losses(log_history(reference / f"checkpoint-{STEPS}"))
    assert sorted(expected) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.finetune", *common, "--output", str(out)]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while last_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert still_running, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-2000:]
    assert not (out / "model").exists()
    done = int(last_checkpoint(out).name.split("-")[1])
    assert done < STEPS

    resumed = run_cli(*common, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = log_history(out / f"checkpoint-{STEPS}")
    got = step_losses(final)
    assert sorted(got) == list(range(1, STEPS + 1))  # each step once: continued, not restarted
    output = resumed.stdout + resumed.stderr
    assert f"resuming from {out / f'checkpoint-{done}'}" in output
    assert output.count("{'loss':") == STEPS - done  # only the remaining steps were trained
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step]), (step, got[step], expected[step])
    assert (out / "model" / "model.safetensors").is_file()


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if "checkpoint-" in str(p)}


def test_finished_run_resumed_is_left_as_it_is(reference: Path, caplog):
    """--resume on a finished run (no other option: they come from run_config.yaml) says so and
    exits 0 without training or touching checkpoints."""
    before = _snapshot(reference)
    with caplog.at_level(logging.INFO):
        assert main(["--output", str(reference), "--resume"]) == 0
    assert f"is already complete (checkpoint-{STEPS} is its last step)" in caplog.text
    assert _snapshot(reference) == before


def test_finished_run_without_its_export_only_exports(tmp_path: Path, reference: Path):
    """Killed after the last checkpoint but before the export: --resume writes adapter/ and model/
    from that checkpoint, with no training step."""
    out = tmp_path / "out"
    shutil.copytree(reference / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")
    shutil.copy2(reference / "run_config.yaml", out)
    assert main(["--output", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", f"checkpoint-{STEPS}", "model", "run_config.yaml"]
    assert (out / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("changed, named", [
    (["--lora-rank", "4"], "--lora-rank 4 (this run: 8)"),
    (["--max-seq-len", "64"], "--max-seq-len 64 (this run: 128)"),
    (["--data", "OTHER"], "--data"),
])
def test_resume_refuses_a_changed_model_or_data_option(reference: Path, common: list[str], tmp_path: Path,
                                                       changed: list[str], named: str, caplog):
    """run_config.yaml remembers the run: a changed option that shapes the model or data is one line
    naming it (not a state_dict size mismatch, not a silently different run)."""
    if changed[1] == "OTHER":
        changed = [changed[0], str(tmp_path / "other.jsonl")]
        Path(changed[1]).write_text(json.dumps({"input": "<_user>q", "output": "a"}) + "\n")
    with caplog.at_level(logging.ERROR):
        assert main(common + ["--output", str(reference), "--resume", *changed]) == EXIT_USAGE
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "a resumed run keeps the options that shape its model and data" in message and named in message
    assert "\n" not in message


def test_resume_refuses_a_changed_backend(reference: Path, common: list[str], tmp_path: Path, caplog):
    """--backend is fixed for a run (DeepSpeed and FSDP checkpoints differ): a run recorded as FSDP
    resumed with --backend deepspeed is refused by name. (FSDP itself needs GPUs, so the recorded
    run is edited here.)"""
    out = tmp_path / "out"
    shutil.copytree(reference / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")
    saved = (reference / "run_config.yaml").read_text(encoding="utf-8")
    assert "backend: deepspeed" in saved
    (out / "run_config.yaml").write_text(saved.replace("backend: deepspeed", "backend: fsdp"), encoding="utf-8")
    with caplog.at_level(logging.ERROR):
        assert main(common + ["--output", str(out), "--resume", "--backend", "deepspeed"]) == EXIT_USAGE
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "--backend deepspeed (this run: fsdp)" in message
