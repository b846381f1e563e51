"""Run the test suite: ``python run_tests.py [pytest args]``.

On first use it creates ``.venv`` with the pinned ``dev`` extra (see bootstrap.py), then runs
pytest there. CPU only; GPU-marked tests skip themselves without a CUDA device. Browser tests need
Debian's ``chromium`` (``apt-get install chromium``); they skip without it unless
``TELECHAT_REQUIRE_BROWSER=1`` (CI sets it).
"""

from __future__ import annotations

import os
import sys

from bootstrap import ensure_env


def main() -> int:
    """Ensure the environment, then hand over to pytest with our defaults."""
    ensure_env(["dev"])
    # Two-core machines: one BLAS thread per process keeps the engine, the servers under test and
    # pytest from oversubscribing the cores; gptqmodel needs its worker count set on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pytest

    return pytest.main(["-q", "-ra", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
