"""Fine-tuning throughput on GPU (issue 6 §4): TeleChat-7B shape, random init, bf16, seq 2048.

    python bench/finetune.py lora                                 # LoRA, 1 GPU
    torchrun --nproc_per_node 4 bench/finetune.py full            # full SFT, ZeRO-3 (DeepSpeed)
    torchrun --nproc_per_node 4 bench/finetune.py full --backend fsdp   # FSDP2 instead

Prints tokens/s per GPU, peak memory and MFU, and appends a JSON line with ``--json``. The loop is
the model's real training step (forward with labels, backward, clip, AdamW step); data are random
full-length rows, so there is no padding and no packing mask.

FLOPs per trained token (N = weights of every matmul: the blocks' linears and the LM head,
not the embedding lookup; L layers, h hidden size, T sequence length):

- full SFT:  6·N + 6·L·h·T. 6·N = forward 2·N + backward 4·N (activation and weight gradients).
  Attention scores and values cost 4·L·h·T per token forward over the full T×T square; a causal
  kernel does half, 2·L·h·T, and backward twice that: 6·L·h·T. (PaLM's appendix-B convention
  counts the full square, 12·L·h·T; it is printed as ``mfu_palm`` for comparison.)
- LoRA: 4·N + 6·N_lora + 6·L·h·T. Frozen weights need the activation-gradient matmul in
  backward but no weight-gradient one, so the honest count is 4·N, not 6·N (which would inflate
  MFU by about 1.5x); the adapters themselves are trained in full (6·N_lora).

Activation-checkpointing recomputation (``--gc``) is not counted (MFU, not hardware FLOPs).
DeepSpeed is optional: when it is missing, ``full`` says so and uses FSDP2 (``--backend auto``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telechat.model.config import preset  # noqa: E402
from telechat.model.modeling import TelechatBlock, TelechatForCausalLM  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
"""Dense bf16 peak per GPU (no sparsity), by name fragment."""

LORA_TARGETS = ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("lora", "full"), help="lora: 1 GPU PEFT LoRA; full: all weights, sharded")
    p.add_argument("--backend", choices=("auto", "deepspeed", "fsdp"), default="auto",
                   help="full only: ZeRO-3 via DeepSpeed, or torch FSDP2 (auto: DeepSpeed if installed)")
    p.add_argument("--preset", default="7B", help="model shape (default 7B)")
    p.add_argument("--layers", type=int, help="override the layer count (quick trials)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--batch", type=int, default=2, help="rows per GPU per step (default 2; fits 80 GB without --gc)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--bucket", type=float, help="deepspeed only: ZeRO-3 reduce and prefetch bucket size in elements "
                   "(default: what the Trainer's \"auto\" picks, hidden_size² and 0.9·hidden_size²)")
    p.add_argument("--gc", action="store_true", help="activation checkpointing (saves memory, costs ~1/3 more compute)")
    p.add_argument("--loss-chunk", type=int, help="chunked LM-head + cross-entropy, this many tokens at a time "
                   "(telechat.model.losses: no full logits in memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block (fuses norms, RoPE, SwiGLU)")
    p.add_argument("--profile", action="store_true", help="profile one step after the timed ones and print the "
                   "top GPU kernels and time per kernel family")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU (default: from the GPU name)")
    p.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------- FLOPs


def matmul_params(config) -> int:
    """N: weights used in a matmul per token (block linears + LM head), from the config alone."""
    h, f, L = config.hidden_size, config.ffn_hidden_size, config.n_layer
    kv = 2 * config.num_key_value_heads * config.head_dim
    per_layer = h * h + h * kv + h * h + 3 * h * f  # query, key_value, dense, gate/up/down
    return L * per_layer + h * config.vocab_size


def flops_per_token(config, seq: int, lora_params: int | None) -> tuple[float, float]:
    """(causal-aware FLOPs, PaLM-convention FLOPs) per trained token; see the module docstring."""
    n = matmul_params(config)
    attn = 6 * config.n_layer * config.hidden_size * seq
    linear = 6 * n if lora_params is None else 4 * n + 6 * lora_params
    return linear + attn, linear + 2 * attn


def peak_flops(override: float | None) -> float:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")


# ---------------------------------------------------------------------------------------------- models


def build_lora(config, rank: int, gc: bool):
    from peft import LoraConfig, get_peft_model

    with torch.device("cuda"):
        model = TelechatForCausalLM._from_config(config, dtype=torch.bfloat16)
    if gc:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))  # adapters in fp32 (PEFT autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)
    return model, opt, sum(p.numel() for p in params)


def build_deepspeed(config, batch: int, gc: bool, bucket: float | None):
    """(engine, optimizer, HfDeepSpeedConfig): keep the last alive while the model is in use."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = {
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": int(bucket or config.hidden_size ** 2),
                              "stage3_prefetch_bucket_size": int(bucket or 0.9 * config.hidden_size ** 2),
                              "stage3_param_persistence_threshold": 10 * config.hidden_size},
    }
    deepspeed.init_distributed()
    # While this object lives, transformers builds models under deepspeed.zero.Init: each rank
    # only ever materialises its shard (the same path the Trainer takes for ZeRO-3).
    hf_config = HfDeepSpeedConfig(ds_config)
    model = TelechatForCausalLM._from_config(config, dtype=torch.bfloat16)
    if gc:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    # A torch optimizer, not a DS "optimizer" block: no FusedAdam JIT build (needs nvcc) on the box.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine, opt, hf_config


def build_fsdp(config, gc: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.distributed.init_process_group("nccl")
    with torch.device("meta"):
        model = TelechatForCausalLM(config)  # fp32 master weights, sharded below
    if gc:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, TelechatBlock):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device="cuda")
    with torch.no_grad():  # random init of the local shards (values only need to be sane)
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "ln_f.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    return model, opt


# ---------------------------------------------------------------------------------------------- loop


KERNEL_FAMILIES = (("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "wgmma")), ("attention", ("flash", "fmha", "attn")),
                   ("nccl", ("nccl",)), ("optimizer", ("adam", "multi_tensor")),
                   ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")))


def profile_step(step, rank: int) -> None:
    """One profiled training step: the 15 longest GPU kernels and the time per kernel family."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    if rank:
        return
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) or 1
    families: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other (elementwise, norms)")
        families[family] = families.get(family, 0) + e.self_device_time_total
    print(f"profiled step: {total / 1e3:.1f} ms of GPU kernels", flush=True)
    for family, t in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {family:28s} {t / 1e3:9.1f} ms {100 * t / total:5.1f} %")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / 1e3:9.1f} ms  x{e.count:<5d} {e.key[:110]}")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/finetune.py measures GPU throughput: no CUDA device is visible")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    overrides = {"n_layer": args.layers} if args.layers else {}
    config = preset(args.preset, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False, **overrides)
    batch = args.batch
    torch.manual_seed(rank)

    backend, lora_params, engine = "single", None, None
    if args.mode == "lora":
        if world > 1:
            raise SystemExit("lora mode measures one GPU: run it with plain python")
        model, opt, lora_params = build_lora(config, args.lora_rank, args.gc)
    else:
        backend = args.backend
        if backend == "auto":
            backend = "deepspeed" if importlib.util.find_spec("deepspeed") else "fsdp"
            if backend == "fsdp" and rank == 0:
                print("DeepSpeed is not installed: measuring full SFT with torch FSDP2 instead of ZeRO-3 "
                      "(same sharding of params, grads and optimizer state)", flush=True)
        if backend == "deepspeed":
            if importlib.util.find_spec("deepspeed") is None:
                raise SystemExit("--backend deepspeed: DeepSpeed is not installed (pip install deepspeed)")
            engine, opt, _hf_config = build_deepspeed(config, batch, args.gc, args.bucket)
            model = engine
        else:
            model, opt = build_fsdp(config, args.gc)
    model.train()
    core = getattr(model, "module", model)  # DeepSpeed engine
    core = core.get_base_model() if hasattr(core, "get_base_model") else core  # PEFT
    core.loss_chunk_tokens = args.loss_chunk
    if args.compile:
        for block in core.transformer.h:
            block.compile()

    def step() -> None:
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda")
        ctx = torch.autocast("cuda", torch.bfloat16) if args.mode == "lora" else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        if engine is not None:
            engine.backward(loss)
            engine.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup):
            step()
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"out of GPU memory at --batch {batch} --seq {args.seq}: lower --batch or add --gc") from None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    tokens_per_gpu = batch * args.seq * args.steps / elapsed
    peak = torch.tensor([torch.cuda.max_memory_allocated()], device="cuda", dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    flops, flops_palm = flops_per_token(config, args.seq, lora_params)
    peak_fl = peak_flops(args.peak_tflops)
    result = {
        "mode": args.mode, "backend": backend, "gpus": world, "gpu": torch.cuda.get_device_name(),
        "preset": args.preset, "layers": config.n_layer, "seq": args.seq, "batch_per_gpu": batch,
        "gc": args.gc, "loss_chunk": args.loss_chunk, "compile": args.compile,
        "bucket": args.bucket if backend == "deepspeed" else None,
        "lora_rank": args.lora_rank if lora_params else None, "lora_params": lora_params,
        "matmul_params": matmul_params(config), "step_s": round(elapsed / args.steps, 3),
        "tokens_per_s_per_gpu": round(tokens_per_gpu, 1), "peak_mem_gib": round(peak.item() / 2 ** 30, 2),
        "mfu": round(tokens_per_gpu * flops / peak_fl, 4), "mfu_palm": round(tokens_per_gpu * flops_palm / peak_fl, 4),
        "flops_per_token": flops, "torch": torch.__version__,
    }
    if args.profile:
        profile_step(step, rank)
    if rank == 0:
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            with args.json.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
