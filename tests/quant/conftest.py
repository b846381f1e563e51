"""A small TeleChat trained on real text (so perplexity means something), quantized once per session.

Shape: hidden 128, ffn 256, 2 layers: every Linear input width is a multiple of the GPTQ group
size 128. Data: the official SFT examples (Chinese chat), the first 90% for training and
calibration, the tail held out for perplexity.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import SFT_DATA, fixture_file

TRAIN_STEPS = 300
SEQ_LEN = 128
CALIB_SAMPLES = 64


@pytest.fixture(scope="session")
def sft_file() -> Path:
    return fixture_file(SFT_DATA / "single_turn_example.jsonl")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, sft_file: Path) -> Path:
    """A checkpoint folder (7B layout, demo BPE tokenizer) trained for a few hundred steps."""
    from telechat.chat_format import ChatFormat, messages_from_official
    from telechat.model.config import TelechatConfig
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out = tmp_path_factory.mktemp("quant") / "small"
    special = build_demo_tokenizer(out)
    tokenizer = load_tokenizer(out)
    generation = {"max_length": 512, "do_sample": False, **special}
    chat = ChatFormat(tokenizer, generation)
    records = [json.loads(line) for line in sft_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = records[: int(len(records) * 0.9)]  # the calibration file's held-out tail stays unseen
    stream = [t for r in train for p, a in chat.encode_turns(messages_from_official(r["input"], r["output"]))
              for t in p + a]
    config = TelechatConfig(
        vocab_size=len(tokenizer), hidden_size=128, n_layer=2, n_head=4, ffn_hidden_size=256,
        training_seqlen=512, seq_length=512, architectures=["TelechatForCausalLM"],
        bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"],
    )
    torch.manual_seed(0)
    model = TelechatForCausalLM(config)
    _train(model, torch.tensor(stream), steps=TRAIN_STEPS)
    model.save_pretrained(out)  # writes its own generation_config.json: replace it with ours
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return out


def _train(model, stream: torch.Tensor, *, steps: int, batch_size: int = 8) -> None:
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = [rng.randrange(len(stream) - SEQ_LEN - 1) for _ in range(batch_size)]
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def quantize_args(model: Path, calib: Path, out: Path, bits: int, *extra: str) -> list[str]:
    """argv of a small, fast ``telechat quantize`` run."""
    return ["--model", str(model), "--bits", str(bits), "--calib", str(calib), "--calib-samples", str(CALIB_SAMPLES),
            "--calib-seq-len", str(SEQ_LEN), "--eval-seq-len", str(SEQ_LEN), "--eval-max-tokens", "8192",
            "--device", "cpu", "--output", str(out), *extra]


@pytest.fixture(scope="session")
def quantized(trained_model: Path, sft_file: Path):
    """``bits -> output folder`` of ``telechat quantize`` on the trained model (each built once)."""
    from jobs.quant.cli import main

    built: dict[int, Path] = {}

    def get(bits: int) -> Path:
        if bits not in built:
            out = trained_model.parent / f"small-int{bits}"
            assert main(quantize_args(trained_model, sft_file, out, bits)) == 0
            built[bits] = out
        return built[bits]

    return get
