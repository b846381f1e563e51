"""Random-init checkpoints of a released shape (or ``tiny``) with the demo tokenizer, for serving benchmarks.

    python bench/random_checkpoint.py 7B /tmp/telechat-bench/7B      # written once, reused after

Random weights decode at the same speed as trained ones (same shapes, same kernels); the demo
tokenizer makes the folder servable by ``telechat serve``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.model.config import PRESETS, TelechatConfig, preset  # noqa: E402

TINY = dict(vocab_size=2048, hidden_size=128, n_layer=2, n_head=4, ffn_hidden_size=352)
"""A CPU-sized shape (the demo model's, head_dim 32) for smoke runs of every benchmark; its vocabulary
holds the demo tokenizer's."""

PRESET_NAMES = (*PRESETS, "tiny")

DONE = ".random-checkpoint.json"
"""Written last into a complete folder: which shape it holds (an interrupted write has none)."""


def bench_config(name: str, **overrides) -> TelechatConfig:
    """The config of a released shape (``7B``, ``12B``, ``1B``) or ``tiny``, with overrides."""
    if name == "tiny":
        return TelechatConfig(**{**TINY, **overrides})
    return preset(name, **overrides)


def write_random_checkpoint(name: str, out: str | Path, seq_length: int = 8192) -> Path:
    """Write a random-init checkpoint of shape ``name`` with the demo tokenizer to ``out``; reuse it if there.

    bf16 on CUDA, float32 on CPU. The ``lm_head`` rows of every id but the tokenizer's plain tokens that
    decode to whole characters are zeroed, so greedy picks only those (each output token is text at once:
    a stream's first token is its first content chunk), while every step still computes the full head.
    """
    import torch

    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer, load_tokenizer

    out = Path(out)
    cuda = torch.cuda.is_available()
    want = {"preset": name, "seq_length": seq_length, "dtype": "bfloat16" if cuda else "float32"}
    if (out / DONE).is_file() and json.loads((out / DONE).read_text(encoding="utf-8")) == want:
        return out
    shutil.rmtree(out, ignore_errors=True)
    special = build_demo_tokenizer(out)
    tokenizer = load_tokenizer(out)
    n_tok = len(tokenizer)
    specials = set(tokenizer.all_special_ids)
    text_ids = [i for i in range(n_tok) if i not in specials and "\ufffd" not in tokenizer.decode([i])]
    config = bench_config(name, bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                          pad_token_id=special["pad_token_id"], architectures=["TelechatForCausalLM"],
                          seq_length=seq_length)
    if config.vocab_size < n_tok:
        raise ValueError(f"shape {name} has {config.vocab_size} vocabulary rows, fewer than the demo "
                         f"tokenizer's {n_tok}")
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = TelechatForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    silent = torch.ones(config.vocab_size, dtype=torch.bool)
    silent[text_ids] = False
    with torch.no_grad():
        model.get_output_embeddings().weight[silent.to(model.device)] = 0
    model.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()  # a server started from this process sizes its KV pool from free GPU memory
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, **special}), encoding="utf-8")
    (out / DONE).write_text(json.dumps(want), encoding="utf-8")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=PRESET_NAMES)
    p.add_argument("out", type=Path, help="folder to write (kept and reused when it already holds this shape)")
    p.add_argument("--seq-length", type=int, default=8192, help="the config's seq_length (the server's context)")
    args = p.parse_args()
    t = time.perf_counter()
    write_random_checkpoint(args.preset, args.out, args.seq_length)
    print(json.dumps({"measure": "random_checkpoint", "preset": args.preset, "path": str(args.out),
                      "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
