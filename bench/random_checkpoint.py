"""Random-init checkpoints of a released shape (or ``tiny``) with the demo tokenizer, for serving benchmarks.

    python bench/random_checkpoint.py 7B /tmp/telechat-bench/7B      # written once, reused after
    python bench/random_checkpoint.py 7B /tmp/telechat-bench/7B-int4 --gptq-bits 4   # GPTQ-packed int4

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


def write_random_gptq(name: str, out: str | Path, bits: int = 4, group_size: int = 128, seq_length: int = 8192
                      ) -> Path:
    """Write a random GPTQ checkpoint of shape ``name`` to ``out`` (reused if there): the layout the quant job
    writes (``quantization_config``, AutoGPTQ v1 packing, symmetric, no act-order, fp16 scales and dense
    tensors), with random codes and scales instead of quantized weights — the int kernels decode it at the speed
    of a quantized model without the minutes of GPTQ. Every Linear of the decoder blocks is packed (shapes and
    biases as the model defines them); the embeddings, norms and ``lm_head`` stay dense. Codes are uniform over
    the ``2**bits`` levels, scales keep the dequantized weights near the random init's spread. No tokenizer
    (benchmarks feed token ids)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from telechat.model.modeling import TelechatForCausalLM

    out = Path(out)
    want = {"preset": name, "seq_length": seq_length, "gptq_bits": bits, "group_size": group_size}
    if (out / DONE).is_file() and json.loads((out / DONE).read_text(encoding="utf-8")) == want:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq"}
    config = bench_config(name, architectures=["TelechatForCausalLM"], seq_length=seq_length)
    with torch.device("meta"):
        model = TelechatForCausalLM(config)
    per_word = 32 // bits
    zero = sum((2 ** (bits - 1) - 1) << (bits * i) for i in range(per_word))  # v1 stores zero point - 1
    zero = zero - (1 << 32) if zero >= 1 << 31 else zero
    g = torch.Generator().manual_seed(0)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer.h.")}
    tensors = {}
    for key, module in packed.items():
        n, k = module.weight.shape
        tensors[key + ".qweight"] = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // per_word, n), generator=g,
                                                  dtype=torch.int32)
        tensors[key + ".qzeros"] = torch.full((k // group_size, n // per_word), zero, dtype=torch.int32)
        tensors[key + ".scales"] = (torch.rand(k // group_size, n, generator=g) * 0.004 + 0.002).half()
        tensors[key + ".g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
        if module.bias is not None:
            tensors[key + ".bias"] = torch.zeros(n, dtype=torch.float16)
    for key, param in model.named_parameters():  # a tied lm_head is listed once, as the embeddings
        if key.rpartition(".")[0] not in packed:  # embeddings, norms, an untied lm_head
            tensors[key] = (torch.randn(*param.shape, generator=g) * 0.02 if param.dim() == 2
                            else torch.ones(param.shape)).half()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "float16",
                                                 "quantization_config": qcfg}, indent=2), encoding="utf-8")
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2), encoding="utf-8")
    (out / DONE).write_text(json.dumps(want), encoding="utf-8")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=PRESET_NAMES)
    p.add_argument("out", type=Path, help="folder to write (kept and reused when it already holds this shape)")
    p.add_argument("--seq-length", type=int, default=8192, help="the config's seq_length (the server's context)")
    p.add_argument("--gptq-bits", type=int, choices=(4, 8), default=None,
                   help="write a GPTQ-packed checkpoint of this many bits (random codes; no tokenizer)")
    args = p.parse_args()
    t = time.perf_counter()
    if args.gptq_bits:
        write_random_gptq(args.preset, args.out, args.gptq_bits, seq_length=args.seq_length)
    else:
        write_random_checkpoint(args.preset, args.out, args.seq_length)
    print(json.dumps({"measure": "random_checkpoint", "preset": args.preset, "path": str(args.out),
                      "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
