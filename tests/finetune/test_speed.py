"""Training speed options on CPU: --loss-chunk-tokens keeps the loss trajectory (num_items_in_batch
included, evaluation unaffected), --compile on runs and matches, FSDP is refused where it cannot run,
and an FSDP checkpoint's sharded weights export like a gathered state dict."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from jobs.finetune.cli import EXIT_USAGE, main
from tests.finetune.conftest import log_history, official_subset, run_cli, step_losses

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, official_sft) -> Path:
    return official_subset(official_sft, tmp_path_factory.mktemp("speed") / "data.jsonl", 16, 8)


@pytest.fixture(scope="module")
def common(tiny_model_dir: Path, data: Path) -> list[str]:
    # two micro-steps of different token counts per step: the loss must be divided by the
    # step's token count (num_items_in_batch), not averaged per micro-step
    return ["--method", "full", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", str(STEPS),
            "--save-steps", str(STEPS), "--logging-steps", "1", "--max-seq-len", "128", "--batch-size", "2",
            "--grad-accum", "2", "--eval-split", "0.2", "--lr", "1e-3", "--no-packing"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, common: list[str]) -> Path:
    """The run with the full logits (--loss-chunk-tokens 0), uncompiled."""
    out = tmp_path_factory.mktemp("plain") / "out"
    assert main(common + ["--output", str(out), "--loss-chunk-tokens", "0"]) == 0
    return out


def _losses(out: Path) -> tuple[dict[int, float], float]:
    history = log_history(out / f"checkpoint-{STEPS}")
    [eval_loss] = [h["eval_loss"] for h in history if "eval_loss" in h]
    return step_losses(history), eval_loss


def _assert_close(got: tuple[dict[int, float], float], expected: tuple[dict[int, float], float]) -> None:
    (steps, eval_loss), (want_steps, want_eval) = got, expected
    assert sorted(steps) == sorted(want_steps) == list(range(1, STEPS + 1))
    for step, loss in want_steps.items():
        assert steps[step] == pytest.approx(loss, rel=1e-5), (step, steps[step], loss)
    assert eval_loss == pytest.approx(want_eval, rel=1e-5)


def test_loss_chunks_keep_the_loss_trajectory(tmp_path: Path, common: list[str], plain: Path):
    """40-token chunks (of 256-token micro-batches) give the same training and eval losses as the
    full logits; the run config records the option."""
    out = tmp_path / "chunked"
    assert main(common + ["--output", str(out), "--loss-chunk-tokens", "40"]) == 0
    _assert_close(_losses(out), _losses(plain))
    assert "loss_chunk_tokens: 40" in (out / "run_config.yaml").read_text()
    assert "loss_chunk_tokens: 0" in (plain / "run_config.yaml").read_text()


def test_compiled_blocks_train_and_evaluate(tmp_path: Path, common: list[str], plain: Path):
    """--compile on (CPU: inductor's C++ backend, ~40 s of compiling on 2 cores) trains and evaluates
    with the same losses, says that it compiles, and exports the usual tensor names."""
    out = tmp_path / "compiled"
    done = run_cli(*common, "--output", str(out), "--compile", "on", timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "compiling the 2 decoder blocks (torch.compile): the first steps" in done.stdout + done.stderr
    _assert_close(_losses(out), _losses(plain))
    assert "compile: 'on'" in (out / "run_config.yaml").read_text()
    assert "compile: 'off'" in (plain / "run_config.yaml").read_text()  # auto settles to off on CPU
    from tests.finetune.test_lora import tensor_names

    assert tensor_names(out / "model") == tensor_names(plain / "model")


@pytest.mark.parametrize("extra, message", [
    (["--method", "lora"], "--backend fsdp shards full SFT"),
    (["--zero", "3"], "DeepSpeed options"),
])
def test_fsdp_option_errors(tiny_model_dir: Path, data: Path, tmp_path: Path, extra, message, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CPU refusal
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    args = ["--method", "full", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
            "--backend", "fsdp", *extra]
    with caplog.at_level(logging.ERROR):
        assert main(args) == EXIT_USAGE
    assert message in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fsdp_refused_on_cpu(tiny_model_dir: Path, data: Path, tmp_path: Path, caplog):
    """accelerate enables FSDP for accelerator processes only (a CPU/gloo job would silently fall
    back to plain data parallel): on CPU, --backend fsdp is one line naming the alternative."""
    with caplog.at_level(logging.ERROR):
        assert main(["--method", "full", "--model", str(tiny_model_dir), "--data", str(data),
                     "--output", str(tmp_path / "o"), "--backend", "fsdp"]) == EXIT_USAGE
    assert "--backend fsdp needs GPUs" in caplog.text and "--backend deepspeed" in caplog.text


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_shards_load_as_the_full_state_dict(tmp_path: Path, tiny_model_dir: Path):
    """A checkpoint's ``pytorch_model_fsdp_0`` (torch.distributed.checkpoint, as accelerate saves
    FSDP2 shards) reads back into the full state dict that the export writes."""
    import torch.distributed.checkpoint as dcp

    from jobs.finetune.workflow import load_fsdp_shards
    from telechat.model.loader import load_model

    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # not the random init a fresh model would have
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "shards"))
    state = load_fsdp_shards(tmp_path / "shards", model.config)
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
