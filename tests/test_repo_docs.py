"""The repository documents itself: folder names the docs promise are the ones jobs write, and every
design note the code cites is in docs/."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_models_readme_names_the_quantize_output():
    """models/README.md shows the folder `telechat quantize` writes by default (MODEL-GPTQ-Int{bits})."""
    cli = (REPO / "jobs" / "quant" / "cli.py").read_text(encoding="utf-8")
    assert 'f"{args.model.name}-GPTQ-Int{args.bits}"' in cli
    readme = (REPO / "models" / "README.md").read_text(encoding="utf-8")
    assert "TeleChat-7B-GPTQ-Int4/" in readme
    assert not re.search(r"gptq-int4", readme)
