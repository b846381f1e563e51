"""Options: YAML + flags precedence, cross-field checks with actionable errors, --help on every option."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.finetune.hparams import DEFAULT_LORA_TARGETS
from jobs.finetune.parser import ArgsError, build_parser, parse_args
from telechat.errors import UserError
from tests.finetune.conftest import run_cli


@pytest.fixture()
def base(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "<_user>q", "output": "a"}\n')
    return ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "out")]


def test_every_option_has_help():
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "local_rank"):
            assert action.help, action.option_strings


def test_defaults_work_on_this_machine(base):
    import torch

    args = parse_args(base)
    assert args.train.method == "lora" and args.train.lr == 2e-4
    assert args.lora_targets == DEFAULT_LORA_TARGETS.split(",")
    assert args.train.precision == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                    else "fp16" if torch.cuda.is_available() else "fp32")
    assert parse_args(base + ["--method", "full"]).train.lr == 3e-5


def test_yaml_values_and_flag_overrides(tmp_path: Path, base):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: full\nlr: 1e-5\nmax-seq-len: 512\npacking: false\neval_split: 0.1\nsave_steps: 7\n")
    args = parse_args(base + ["--config", str(cfg), "--lr", "2e-5"])
    assert args.train.method == "full" and args.train.lr == 2e-5  # flag wins
    assert args.data.max_seq_len == 512 and args.data.packing is False
    assert args.train.eval_steps == 7  # defaults to --save-steps when evaluating
    cfg.write_text("learning_rate: 1e-5\n")
    with pytest.raises(ArgsError, match="unknown option 'learning_rate'"):
        parse_args(base + ["--config", str(cfg)])


@pytest.mark.parametrize("extra, message", [
    (["--offload"], "add --zero 2 or --zero 3"),
    (["--from-scratch", "7B"], "exactly one of --model"),
    (["--hidden-size", "64"], "needs --from-scratch"),
    (["--eval-steps", "5"], "set --eval-split"),
    (["--eval-split", "1.5"], r"fraction in \[0, 1\)"),
    (["--lora-rank", "0"], "--lora-rank >= 1"),
    (["--resume"], "no complete checkpoint-N"),
    (["--max-seq-len", "8"], "at least 16"),
])
def test_cross_field_errors_say_what_to_do(base, extra, message):
    with pytest.raises(ArgsError, match=message):
        parse_args(base + extra)


def test_from_scratch_needs_full_and_tokenizer(tiny_model_dir: Path, base):
    scratch = base[2:] + ["--from-scratch", "7B"]
    with pytest.raises(ArgsError, match="use --method full"):
        parse_args(scratch)
    with pytest.raises(ArgsError, match="needs --tokenizer"):
        parse_args(scratch + ["--method", "full"])
    args = parse_args(scratch + ["--method", "full", "--tokenizer", str(tiny_model_dir), "--layers", "2"])
    assert args.model.from_scratch == "7B" and args.model.layers == 2


def test_existing_checkpoints_need_resume_or_overwrite(base, tmp_path: Path):
    ckpt = tmp_path / "out" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    with pytest.raises(ArgsError, match="pass --resume to continue the run in it, --overwrite to start a new run"):
        parse_args(base)
    with pytest.raises(ArgsError, match="no complete checkpoint"):
        parse_args(base + ["--resume"])  # no trainer_state.json: a save that was cut short
    (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "checkpoint-6").mkdir()  # newer but incomplete: skipped
    assert parse_args(base + ["--resume"]).train.resume == str(ckpt)
    assert parse_args(base + ["--overwrite"]).train.resume is None


def test_non_empty_output_needs_overwrite(base, tmp_path: Path):
    """Any file in --output (not only checkpoints) makes a new run ask for --overwrite or --resume."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "NOTES.txt").write_text("mine")
    with pytest.raises(ArgsError, match="is not empty: pass --resume .* --overwrite"):
        parse_args(base)
    assert parse_args(base + ["--overwrite"]).train.overwrite


def test_missing_model_is_one_line_not_a_traceback(tmp_path: Path):
    """`--model` that does not exist: exit code 2 and one line on stderr naming the fix."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "<_user>q", "output": "a"}\n')
    done = run_cli("--model", str(tmp_path / "missing"), "--data", str(data), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing does not exist; pass --model" in lines[0], done.stderr


def test_model_without_tokenizer_names_the_fix(base, tmp_path: Path, tiny_model_dir: Path):
    """A checkpoint folder without tokenizer files (and no --tokenizer) is refused before loading anything."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(UserError, match="has no tokenizer.model or tokenizer.json") as err:
        parse_args(["--model", str(bare)] + base[2:])
    assert "\n" not in str(err.value)
    assert parse_args(["--model", str(bare), "--tokenizer", str(tiny_model_dir)] + base[2:]).model.model == str(bare)
