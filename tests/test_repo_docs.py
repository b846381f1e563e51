"""The repository documents itself: folder names the docs promise are the ones jobs write, and every
design note the code cites is in docs/."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO


def test_models_readme_names_the_quantize_output():
    """models/README.md shows the folder `telechat quantize` writes by default (MODEL-GPTQ-Int{bits})."""
    cli = (REPO / "jobs" / "quant" / "cli.py").read_text(encoding="utf-8")
    assert 'f"{args.model.name}-GPTQ-Int{args.bits}"' in cli
    readme = (REPO / "models" / "README.md").read_text(encoding="utf-8")
    assert "TeleChat-7B-GPTQ-Int4/" in readme
    assert not re.search(r"gptq-int4", readme)


def test_reference_fixtures_are_in_the_repo():
    """The official files the tests compare against ship in tests/fixtures, not beside the checkout."""
    from tests.conftest import GOLDEN_DIR, REF, SFT_DATA, TOKENIZER_12B

    assert REF == REPO / "tests" / "fixtures"
    needed = [TOKENIZER_12B / "tokenizer.model", GOLDEN_DIR / "v7b" / "refs.npz", GOLDEN_DIR / "v7b" / "model.safetensors",
              SFT_DATA / "single_turn_example.jsonl", SFT_DATA / "multi_turn_example.jsonl", SFT_DATA / "test.jsonl",
              *(REF / "configs" / name / "config.json" for name in ("7B", "12B", "12B-V2"))]
    assert [p for p in needed if not p.is_file()] == []
    assert sum(p.stat().st_size for p in REF.rglob("*") if p.is_file()) < 8 * 2**20


def test_design_notes_cited_by_the_code_are_in_docs():
    """No comment cites notes outside the repository (SPEC.md, DESIGN.md, PACKAGES.md); every
    docs/*.md a file cites exists."""
    sources = [p for ext in ("py", "md", "yaml", "sh", "toml") for p in REPO.glob(f"**/*.{ext}")
               if not {".venv", ".venv-vllm", "build", "fixtures", ".git", "node_modules"} & set(p.parts)
               and p.resolve() != Path(__file__).resolve()]
    outside, missing = [], set()
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="replace")
        outside += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                    if re.search(r"\b(SPEC|DESIGN|PACKAGES)\.md\b", line)]
        missing |= {m for m in re.findall(r"\bdocs/[\w.-]+\.md\b", text) if not (REPO / m).is_file()}
    assert outside == [] and missing == set()
