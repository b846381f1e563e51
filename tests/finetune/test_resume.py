"""Resume after a hard kill: the step count continues and the losses match an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from jobs.finetune.cli import main
from jobs.finetune.parser import last_checkpoint
from tests.conftest import REPO
from tests.finetune.conftest import child_env, log_history, official_subset, run_cli, step_losses

STEPS = 12


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path, official_sft):
    data = official_subset(official_sft, tmp_path / "data.jsonl", 40, 20)
    common = ["--method", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", str(STEPS),
              "--save-steps", "3", "--logging-steps", "1", "--batch-size", "4", "--max-seq-len", "128",
              "--lr", "1e-3", "--seed", "7"]  # LoRA dropout stays on: resuming must restore the RNG too

    reference = tmp_path / "reference"
    assert main(common + ["--output", str(reference)]) == 0
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
