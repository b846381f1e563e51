"""GPTQ benchmark (issue 7 §5): quantization wall time and engine decode tok/s, int4 vs bf16.

Random weights of a released shape (default the 7B) are saved once as a bf16 checkpoint, GPTQ-
quantized through the job's own code path (``jobs.quant.gptq.quantize``, random-token calibration:
the time depends on shapes and sample count, not on the values), then the bf16 baseline and the
int4 model (fp16 activations: GPTQ scales are fp16) decode through our engine in the same process. One JSON line per measurement, then a
table for bench/RESULTS.md.

    python bench/quant.py --preset 7B --work-dir /tmp/quant-bench
    python bench/quant.py --layers 2 --calib-samples 8     # quick check of the script

Needs CUDA, gptqmodel 7.6 and optimum (``pip install 'telechat-stack[quant]'``; offline:
``pip install --no-index --find-links WHEELS gptqmodel==7.6.0 optimum==2.3.0``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REQUIRED = {"torch": "torch", "transformers": "transformers", "gptqmodel": "gptqmodel==7.6.0",
            "optimum": "optimum==2.3.0", "safetensors": "safetensors"}
RESULTS: list[dict] = []


def check_dependencies() -> None:
    """Exit with one line naming every missing package and how to install it."""
    missing = [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit(f"bench/quant.py: missing {', '.join(missing)}; install them with "
                         f"`pip install {' '.join(missing)}` (or `pip install --no-index --find-links WHEELS ...` "
                         "from carried wheels), or `pip install 'telechat-stack[quant]'`")


def record(name: str, **values) -> None:
    """Print one measurement as a JSON line and keep it for the table."""
    row = {"measure": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def build_checkpoint(path: Path, preset_name: str, layers: int | None) -> None:
    """Save a random-weight bf16 checkpoint of the preset shape (initialised on the GPU: fast).

    A real checkpoint folder holds its tokenizer and GPTQModel loads it from there, so the demo
    byte-level tokenizer goes in too (its ids fit every preset's vocabulary).
    """
    import torch

    from telechat.model.config import preset
    from telechat.model.modeling import TelechatForCausalLM
    from telechat.tokenizer import build_demo_tokenizer

    cfg = preset(preset_name, **({"n_layer": layers} if layers else {}), architectures=["TelechatForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TelechatForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    build_demo_tokenizer(path)
    del model
    torch.cuda.empty_cache()


def decode_tok_s(model, prompt_len: int, new_tokens: int, batch: int, engine_kwargs: dict) -> dict:
    """Engine decode throughput: ``batch`` random prompts, greedy, fixed output length."""
    import torch

    from telechat.engine.core import EngineConfig, LLMEngine
    from telechat.engine.sampling import SamplingParams

    engine = LLMEngine(model, EngineConfig(max_num_seqs=max(batch, 1), max_model_len=prompt_len + new_tokens + 16,
                                           **engine_kwargs))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return {"batch": batch, "tok_s": round(batch * new_tokens / wall, 1), "wall_s": round(wall, 2)}


def measure_model(label: str, load, args) -> None:
    """Decode figures of one model; falls back to eager / no-graph engine modes if capture fails."""
    import torch

    model = load()
    weight_gb = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 1e9
    kernel = type(model.transformer.h[0].mlp.down_proj).__name__
    for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
        for mode in ({}, {"compile": False}, {"compile": False, "cuda_graphs": False}):
            try:
                r = decode_tok_s(model, args.prompt_len, args.new_tokens, batch, mode)
            except Exception as e:  # noqa: BLE001 - report which engine mode the kernel supports
                record("engine_mode_failed", model=label, batch=batch, mode=mode or "default",
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue
            record("engine_decode", model=label, kernel=kernel, weights_GB=round(weight_gb, 2), mode=mode or "default", **r)
            break
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/telechat-quant-bench"))
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,32")
    args = p.parse_args()
    check_dependencies()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/quant.py needs a CUDA GPU (GPTQ int4 kernels and the timings are GPU figures)")
    from jobs.output import owned_temp_dir
    from jobs.quant.gptq import quantize
    from telechat.model.loader import load_model
    from telechat.model.quantized import load_quantized

    src, out = args.work_dir / f"{args.preset}-bf16", args.work_dir / f"{args.preset}-int{args.bits}"
    record("setup", card=torch.cuda.get_device_name(), torch=torch.__version__,
           transformers=__import__("transformers").__version__, gptqmodel=__import__("gptqmodel").__version__)
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        build_checkpoint(src, args.preset, args.layers)
        record("build_random_checkpoint", seconds=round(time.perf_counter() - t, 1))
    if not (out / "config.json").is_file():
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(1)
        samples = [torch.randint(100, vocab - 100, (args.calib_seq_len,), generator=g).tolist()
                   for _ in range(args.calib_samples)]
        work = owned_temp_dir(args.work_dir, "gptq")  # GPTQModel's scratch folder
        try:
            seconds = quantize(src, out, samples, bits=args.bits, group_size=128, desc_act=False, sym=True,
                               dtype=torch.float16, device="cuda", work=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record("gptq_quantize", bits=args.bits, samples=args.calib_samples, seq_len=args.calib_seq_len,
               seconds=round(seconds, 1))
    measure_model("bf16", lambda: load_model(src, device="cuda", dtype="bfloat16"), args)
    measure_model(f"gptq-int{args.bits}", lambda: load_quantized(out, device="cuda"), args)
    print("\n| measure | values |\n|---|---|")
    for row in RESULTS:
        print(f"| {row['measure']} | " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "measure") + " |")


if __name__ == "__main__":
    main()
