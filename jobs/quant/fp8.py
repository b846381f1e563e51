"""FP8 weights in the compressed-tensors format: the writer behind ``telechat quantize --method fp8``.

No calibration is needed: every Linear of the decoder is quantized on its own (E4M3, one scale per
output channel, :func:`telechat.model.fp8.quantize_weight`) and activations are quantized per token
at run time. Optionally (``--activations static``) each Linear gets a per-tensor input scale, the
largest |input| seen on calibration samples / 448 (:func:`calibrate_input_scales`).

The writer streams: source tensors are read one at a time (safetensors, or memory-mapped ``.bin``),
quantized and gathered into output shards of at most :data:`MAX_SHARD_BYTES`, each written as soon
as it is full, so memory holds one output shard plus one tensor, never two copies of the model.
Keys are written in our (= official 12B) naming; the tied head of the 7B layout stays absent. With
``head`` (``--quantize-head``) ``lm_head`` is stored in FP8 too, untied: the 7B layout's embeddings are
written dense and again, quantized, as ``lm_head`` (``tie_word_embeddings`` false in config.json).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from telechat.model.checkpoint import CheckpointInfo, canonical_key, iter_tensors
from telechat.model.fp8 import FP8_MAX, FP8_MIN_SCALE, HEAD, Fp8Scheme, fp8_quantization_config, quantize_weight

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 4 << 30
"""Output shard size (4 GiB): a 7B FP8 checkpoint is 2 shards; one shard is the writer's peak memory."""
INDEX_FILE = "model.safetensors.index.json"


def meta_model(info: CheckpointInfo):
    """The model ``info`` describes, built on the meta device (no memory): its module names and config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import telechat  # noqa: F401  (registers the Auto classes)

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(info.path))


def quantized_linears(model, scheme: Fp8Scheme) -> set[str]:
    """The ``nn.Linear`` names of ``model`` that ``scheme`` stores in FP8 (ours: all but ``lm_head``, or all)."""
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and scheme.quantizes(name)}


@torch.inference_mode()
def calibrate_input_scales(model, samples: list[list[int]], names: set[str]) -> dict[str, float]:
    """Static per-tensor input scales of the Linears ``names``: max |input| over ``samples`` / 448."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args):
            seen = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], seen) if name in amax else seen
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n in names]
    device = next(model.parameters()).device
    try:
        for sample in tqdm(samples, desc="FP8 calibration", unit="sample"):
            model(input_ids=torch.tensor([sample], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    unseen = sorted(names - set(amax))
    if unseen:
        raise RuntimeError(f"calibration never reached {len(unseen)} Linears (first: {unseen[0]})")
    return {name: max(a.item() / FP8_MAX, FP8_MIN_SCALE) for name, a in amax.items()}


def _source_tensors(info: CheckpointInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of every weight file, one tensor at a time."""
    for file in info.weight_files:
        yield from iter_tensors(file)


def _count_tensors(info: CheckpointInfo) -> int:
    total = 0
    for file in info.weight_files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                total += len(list(f.keys()))
        else:
            total += len(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return total


def write_fp8_checkpoint(
    info: CheckpointInfo,
    out_dir: Path,
    *,
    activations: str = "dynamic",
    input_scales: dict[str, float] | None = None,
    dtype: torch.dtype | None = None,
    head: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``info``'s checkpoint to ``out_dir`` with FP8 Linears (config.json, safetensors shards and,
    when sharded, their index); returns the quantized Linears' names.

    ``input_scales`` (Linear name → scale) is required for ``activations="static"``. ``dtype`` casts
    the tensors left dense (embeddings, norms, biases, head); None keeps the source's. ``head`` stores
    ``lm_head`` in FP8 too (untied from the embeddings where the source ties them).
    """
    from safetensors.torch import save_file

    if (activations == "static") != (input_scales is not None):
        raise ValueError("input_scales are required for static activations and only then")
    model = meta_model(info)
    targets = quantized_linears(model, Fp8Scheme.ours(activations, head))
    tied = model.config.tie_word_embeddings
    embeddings = "transformer.word_embeddings.weight"
    shards: list[tuple[list[str], int]] = []  # per written part: its keys and tensor bytes
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(out_dir / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append((list(current), size))
            current, size = {}, 0

    done: set[str] = set()

    def quantized(module: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_weight(tensor)
        out = {f"{module}.weight": q, f"{module}.weight_scale": scale}
        if input_scales is not None:
            out[f"{module}.input_scale"] = torch.tensor([input_scales[module]], dtype=torch.float32)
        done.add(module)
        return out

    for key, tensor in tqdm(_source_tensors(info), total=_count_tensors(info), desc="FP8", unit="tensor"):
        name = canonical_key(key)
        if name == f"{HEAD}.weight" and tied:
            continue  # the 7B layout's head is the embedding (a .bin may hold both names on one storage)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in targets:
            out = quantized(module, tensor)
        else:
            keep = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            out = {name: keep.contiguous()}
            if name == embeddings and tied and HEAD in targets:
                out.update(quantized(HEAD, tensor))  # the tied head, stored apart in FP8
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
        if current and size + nbytes > max_shard_bytes:
            flush()
        current.update(out)
        size += nbytes
    flush()
    missing = sorted(targets - done)
    if missing:
        raise RuntimeError(f"{info.path} has no weight for {len(missing)} Linears (first: {missing[0]})")
    _name_shards(out_dir, shards)
    config = {**info.config, "quantization_config": fp8_quantization_config(activations, head)}
    if tied and head:
        config["tie_word_embeddings"] = False
    if dtype is not None:  # transformers 5 writes ``dtype``, older releases ``torch_dtype``
        for key in {"dtype", *({"torch_dtype"} & set(config))}:
            config[key] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(done)


def _name_shards(out_dir: Path, shards: list[tuple[list[str], int]]) -> None:
    """Rename the written parts as transformers names shards and write the index (one part: ``model.safetensors``)."""
    if len(shards) == 1:
        (out_dir / "part-00000.safetensors").rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (keys, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / f"part-{i:05d}.safetensors").rename(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": sum(size for _, size in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
