"""The wheel that the Docker images install (non-editable) carries the package data the code reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_carries_demo_data_and_job_configs(tmp_path):
    """demo dialogs/corpus and the DeepSpeed configs are inside the built wheel, next to their modules."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for path in ("telechat/data/demo_dialogs.jsonl", "telechat/data/demo_corpus.txt",
                 "jobs/finetune/ds_zero2.json", "jobs/finetune/ds_zero3_offload.json", "services/web/app.py"):
        assert path in names, f"{path} missing from the wheel"
