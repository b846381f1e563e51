"""``telechat doctor``: what is installed, which GPUs are visible, and whether a model folder is usable."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import platform

PACKAGES = [
    ("torch", "core"), ("transformers", "core"), ("tokenizers", "core"), ("sentencepiece", "core"),
    ("safetensors", "core"), ("accelerate", "core"), ("flash_attn", "optional: faster CUDA attention"),
    ("fastapi", "serve"), ("uvicorn", "serve"), ("sse_starlette", "serve"), ("streamlit", "web"),
    ("peft", "train"), ("deepspeed", "train"), ("gptqmodel", "quant: GPTQ backend"), ("optimum", "quant"),
]


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in (module, module.replace("_", "-")):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "installed"


def main(argv: list[str]) -> int:
    """Print an installation report; exit 1 when a given model folder is not usable."""
    p = argparse.ArgumentParser(prog="telechat doctor", description="Verify the installation (packages, CUDA, "
                                "GPUs) and optionally a model folder.")
    p.add_argument("--model", help="checkpoint folder to validate (config, weights, shards, tokenizer)")
    p.add_argument("--load", action="store_true", help="also load the weights and run one forward pass")
    args = p.parse_args(argv)
    print(f"python        {platform.python_version()} ({platform.system()} {platform.machine()})")
    for module, extra in PACKAGES:
        v = _version(module)
        print(f"{module:<13} {v or 'missing'}" + ("" if v else f"   ({extra})"))
    import torch

    if torch.cuda.is_available():
        print(f"cuda          {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"  gpu {i}       {prop.name}, {prop.total_memory / 2**30:.1f} GiB, "
                  f"compute {prop.major}.{prop.minor}, bf16 {'yes' if prop.major >= 8 else 'no'}")
    else:
        print("cuda          no GPU visible (CPU only)")
    if not args.model:
        return 0
    from telechat.model.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.model, need_tokenizer=True)
    except CheckpointError as e:
        print(f"model         INVALID: {e}")
        return 1
    from telechat.model.config import TelechatConfig
    from telechat.model.fp8 import QUANT_METHOD as FP8_QUANT_METHOD
    from telechat.model.fp8 import fp8_head

    cfg = TelechatConfig.from_pretrained(info.path)
    quant = ("FP8" if info.quant_method == FP8_QUANT_METHOD else "GPTQ") if info.quantized else None
    if quant == "FP8" and fp8_head(cfg):
        quant = "FP8 (lm_head too)"
    layout = "7B-style (tied head)" if cfg.tie_word_embeddings else "12B-style (untied lm_head)"
    print(f"model         {info.path}: {cfg.n_layer} layers, hidden {cfg.hidden_size}, heads {cfg.n_head}"
          f"/{cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}, {layout}, {len(info.weight_files)} weight file(s)"
          f"{', ' + quant if quant else ''}{', DEMO' if info.is_demo else ''}")
    print(f"rope          training_seqlen {cfg.training_seqlen}, NTK base length {cfg.base_seqlen}, "
          f"mode {cfg.rope_mode}")
    if args.load:
        from telechat.model.loader import load_model

        try:
            model = load_model(info.path)
            with torch.inference_mode():
                model(torch.tensor([[1, 2, 3]], device=model.device))
        except CheckpointError as e:
            print(f"load          FAILED: {e}")
            return 1
        print(f"load          ok ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0
