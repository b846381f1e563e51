"""FP8 weights (issue 20): numerics of Fp8Linear, ``telechat quantize --method fp8`` end to end on CPU
(compressed-tensors layout, perplexity within 1 %, greedy agreement reported), round trips through our
loader and through the compressed-tensors library (llm-compressor's writer), clear errors; GPU checks
of the FP8 GEMM path are marked ``gpu``."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tests.conftest import GOLDEN_DIR, telechat
from tests.quant.conftest import CALIB_SAMPLES, SEQ_LEN
from telechat.model.checkpoint import CheckpointError
from telechat.model.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    check_fp8_device,
    fp8_quantization_config,
    quantize_weight,
    read_fp8_scheme,
)

PPL_BUDGET_PCT = 1.0
LINEARS = ("self_attention.query", "self_attention.key_value", "self_attention.dense", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_compressed_tensors = pytest.mark.skipif(sys.version_info < (3, 11),
                                                 reason="compressed-tensors (dev extra) needs Python >= 3.11")


def fp8_args(model: Path, out: Path, *extra: str, calib: Path | None = None) -> list[str]:
    """argv of a small ``telechat quantize --method fp8`` run on CPU (``calib`` also feeds the perplexity)."""
    data = ["--calib", str(calib), "--calib-samples", str(CALIB_SAMPLES), "--calib-seq-len", str(SEQ_LEN)] \
        if calib else []
    return ["--model", str(model), "--method", "fp8", *data, "--eval-seq-len", str(SEQ_LEN),
            "--eval-max-tokens", "8192", "--device", "cpu", "--output", str(out), *extra]


@pytest.fixture(scope="session")
def fp8_quantized(trained_model: Path, sft_file: Path):
    """``(activations, head) -> output folder`` of ``telechat quantize --method fp8 [--quantize-head]`` on the
    trained model."""
    from jobs.quant.cli import main

    built: dict[tuple[str, bool], Path] = {}

    def get(activations: str, head: bool = False) -> Path:
        if (activations, head) not in built:
            out = trained_model.parent / f"small-fp8-{activations}{'-head' if head else ''}"
            extra = ("--activations", activations, *(["--quantize-head"] if head else []))
            assert main(fp8_args(trained_model, out, *extra, calib=sft_file)) == 0
            built[activations, head] = out
        return built[activations, head]

    return get


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (FP8 compared as bytes)."""
    view = (lambda t: t.view(torch.uint8) if t.dtype == FP8_DTYPE else t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(view(a), view(b))


# ---- numerics ---------------------------------------------------------------------------------


def test_weight_quantization_is_per_output_channel():
    """Each row's largest |w| maps onto 448; every weight is within E4M3's half-ulp (2^-4 relative) of
    its dequantized value; an all-zero row stays zero (no 0/0)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different magnitude
    w[5] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (48, 1)
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(48) != 5], torch.full((47,), FP8_MAX))
    dequant = q.float() * scale
    assert (dequant - w).abs().le(w.abs() * 2**-4 + scale * 2**-9).all()
    assert not dequant[5].any() and torch.isfinite(dequant).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_scaled_mm_path_equals_dequantized_reference(dtype, activations):
    """The FP8 GEMM path (torch._scaled_mm with row/column scales, which CPU torch runs too) gives the
    dequantized reference up to its bf16 output rounding, for 1-D to 3-D inputs, with and without bias."""
    torch.manual_seed(0)
    for bias in (True, False):
        dense = nn.Linear(64, 48, bias=bias).to(dtype)
        x = torch.randn(2, 7, 64, dtype=dtype)
        scale = x.abs().amax().item() / FP8_MAX if activations == "static" else None
        module = Fp8Linear.from_linear(dense, activations, input_scale=scale)
        for inp in (x, x[0], x[0, 0]):
            ref, fast = module.forward_reference(inp), module.forward_scaled_mm(inp)
            assert fast.shape == ref.shape == (*inp.shape[:-1], 48) and fast.dtype == dtype
            torch.testing.assert_close(fast.float(), ref.float(), atol=1e-2, rtol=1e-2)
        # quantization error stays small against the dense layer
        err = (module(x).float() - dense(x).float()).abs().max() / dense(x).float().abs().max()
        assert err < 0.05, err


def test_dtype_casts_keep_the_fp8_state():
    """.to(bfloat16)/.half() cast the bias only; to_empty from meta keeps FP8/float32 on the new device."""
    module = Fp8Linear.from_linear(nn.Linear(32, 16), "static", input_scale=0.01)
    weight = module.weight.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(module)
        assert module.weight.dtype == FP8_DTYPE and _same(module.weight, weight)
        assert module.weight_scale.dtype == module.input_scale.dtype == torch.float32
    assert module.bias.dtype == torch.float32
    with torch.device("meta"):
        empty = Fp8Linear(32, 16, activations="dynamic", dtype=torch.bfloat16)
    empty.to_empty(device="cpu")
    assert empty.weight.device.type == "cpu" and empty.weight.dtype == FP8_DTYPE and empty.input_scale is None
    assert set(empty.state_dict()) == {"weight", "weight_scale", "bias"}


def test_gpu_without_fp8_tensor_cores_is_refused_in_one_line(monkeypatch):
    """Below compute capability 8.9 (here a reported A100) FP8 loading stops with one line naming the
    GPU and the fix; CPU is always fine."""
    check_fp8_device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(CheckpointError) as e:
        check_fp8_device("cuda:0")
    message = str(e.value)
    assert message == ("FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is NVIDIA A100-SXM4-80GB (8.0); "
                       "use --method gptq")


# ---- the format ---------------------------------------------------------------------------------


@requires_compressed_tensors
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_written_config_passes_the_compressed_tensors_schema(activations):
    """Our quantization_config validates as compressed-tensors' own pydantic QuantizationConfig and
    reads back as the scheme we meant; the dynamic one is llm-compressor's FP8_DYNAMIC preset."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    ours = fp8_quantization_config(activations)
    parsed = QuantizationConfig.model_validate(ours)
    [group] = parsed.config_groups.values()
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "float-quantized"
    assert parsed.ignore == ["lm_head"] and parsed.kv_cache_scheme is None
    assert (group.weights.type, group.weights.num_bits, group.weights.strategy) == ("float", 8, "channel")
    if activations == "dynamic":
        preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
        assert group.weights == preset.weights and group.input_activations == preset.input_activations
    else:
        assert (group.input_activations.strategy, group.input_activations.dynamic) == ("tensor", False)
    assert read_fp8_scheme(json.loads(json.dumps(ours))).activations == activations


@pytest.mark.parametrize("change, field", [
    (lambda c: c["config_groups"]["group_0"]["weights"].update(type="int"), "weights"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128]),
     "weights"),
    (lambda c: c["config_groups"]["group_0"]["input_activations"].update(strategy="group", group_size=128),
     "input_activations"),
    (lambda c: c.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda c: c["config_groups"].update(group_1=c["config_groups"]["group_0"]), "2 config groups"),
    (lambda c: c.update(format="pack-quantized") or c["config_groups"]["group_0"].pop("format"), "format"),
])
def test_unsupported_compressed_tensors_schemes_fail_in_one_line(change, field):
    """Anything but FP8 weights with dynamic-token / static-tensor activations is refused by field."""
    config = fp8_quantization_config()
    change(config)
    with pytest.raises(CheckpointError) as e:
        read_fp8_scheme(config, "config.json quantization_config")
    assert field in str(e.value) and "\n" not in str(e.value)


# ---- the job ----------------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_job_writes_the_compressed_tensors_layout(fp8_quantized, trained_model: Path, activations):
    """config.json carries the compressed-tensors quantization_config; every decoder Linear is an
    E4M3 weight with a float32 [out, 1] scale (+ a positive [1] input scale when static); embeddings,
    norms and biases are unchanged; the tied head stays absent; companions are copied verbatim."""
    out = fp8_quantized(activations)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fp8_quantization_config(activations)
    source, written = _tensors(trained_model), _tensors(out)
    n_layer = config["n_layer"]
    quantized = {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in LINEARS}
    expected = set(source) | {f"{m}.weight_scale" for m in quantized}
    if activations == "static":
        expected |= {f"{m}.input_scale" for m in quantized}
    assert set(written) == expected and "lm_head.weight" not in written
    for module in quantized:
        weight, scale = written[f"{module}.weight"], written[f"{module}.weight_scale"]
        assert weight.dtype == FP8_DTYPE and weight.shape == source[f"{module}.weight"].shape
        assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0], 1)
        if activations == "static":
            assert written[f"{module}.input_scale"].shape == (1,) and written[f"{module}.input_scale"].item() > 0
    assert all(_same(written[k], t) for k, t in source.items() if k.removesuffix(".weight") not in quantized)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (trained_model / name).read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_perplexity_within_one_percent_and_greedy_agreement_reported(fp8_quantized, trained_model: Path,
                                                                    activations):
    """The report (json and markdown tables like GPTQ's) has both perplexities, a rise within 1 %, and
    the greedy agreement with the original over the golden prompts."""
    from jobs.quant.agreement import GOLDEN_PROMPTS

    out = fp8_quantized(activations)
    report = json.loads((out / "quant_report.json").read_text())
    vocab = json.loads((trained_model / "config.json").read_text())["vocab_size"]
    assert report["method"] == "fp8" and report["activations"] == activations
    assert report["ppl_original"] < vocab / 4, "the test model did not learn; perplexity would mean nothing"
    assert abs(report["ppl_change_pct"]) <= PPL_BUDGET_PCT, report
    assert report["greedy_prompts"] == len(GOLDEN_PROMPTS)
    assert 0 <= report["greedy_identical"] <= len(GOLDEN_PROMPTS) and 0 <= report["greedy_agreement_pct"] <= 100
    markdown = (out / "quant_report.md").read_text()
    assert f"| FP8 ({activations}) |" in markdown and "identical continuations" in markdown
    assert report["calib_samples"] == (CALIB_SAMPLES if activations == "static" else 0)


def test_loads_as_fp8_linears_equal_to_in_memory_quantization(fp8_quantized, trained_model: Path):
    """load_model on the job's output gives Fp8Linear for every decoder Linear (lm_head dense) and the
    same logits as quantizing the dense model's Linears in memory: writer and loader lose nothing."""
    from telechat.model.loader import load_model

    model = load_model(fp8_quantized("dynamic"), device="cpu")
    block = model.transformer.h[0]
    assert all(isinstance(block.get_submodule(name), Fp8Linear) for name in LINEARS)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.word_embeddings.weight
    reference = load_model(trained_model, device="cpu")
    for layer in reference.transformer.h:
        for name in LINEARS:
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, Fp8Linear.from_linear(layer.get_submodule(name)))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_quantize_head_writes_an_untied_fp8_head(fp8_quantized, trained_model: Path, activations):
    """--quantize-head: the tied test model's embeddings are written dense and again as an E4M3 lm_head with
    per-row scales (+ an input scale when static), tie_word_embeddings becomes false, ignore is empty; the
    report names the FP8 head and the perplexity stays within 1 %."""
    out = fp8_quantized(activations, head=True)
    config = json.loads((out / "config.json").read_text())
    assert json.loads((trained_model / "config.json").read_text())["tie_word_embeddings"] is True
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"] == fp8_quantization_config(activations, head=True)
    assert config["quantization_config"]["ignore"] == [] and fp8_quantization_config()["ignore"] == ["lm_head"]
    source, written = _tensors(trained_model), _tensors(out)
    embeddings = source["transformer.word_embeddings.weight"]
    q, scale = quantize_weight(embeddings)
    assert _same(written["transformer.word_embeddings.weight"], embeddings)
    assert _same(written["lm_head.weight"], q) and _same(written["lm_head.weight_scale"], scale)
    assert ("lm_head.input_scale" in written) == (activations == "static")
    assert set(written) - set(source) == {"lm_head.weight", *(k for k in written if k.endswith("_scale"))}
    report = json.loads((out / "quant_report.json").read_text())
    assert "lm_head FP8" in report["scheme"] and abs(report["ppl_change_pct"]) <= PPL_BUDGET_PCT, report
    doctor = telechat("doctor", "--model", str(out))
    assert doctor.returncode == 0 and "FP8 (lm_head too)" in doctor.stdout and "untied" in doctor.stdout, doctor


def test_fp8_head_loads_and_serves_as_quantized_in_memory(fp8_quantized, trained_model: Path):
    """The FP8-head checkpoint loads with an Fp8Linear head beside dense embeddings, gives the logits of the
    same quantization (head included) built in memory, and the serving engine decodes generate()'s tokens."""
    from telechat.engine.core import LLMEngine
    from telechat.engine.sampling import SamplingParams
    from telechat.model.loader import load_model

    model = load_model(fp8_quantized("dynamic", head=True), device="cpu")
    assert isinstance(model.lm_head, Fp8Linear) and model.lm_head.activations == "dynamic"
    assert model.transformer.word_embeddings.weight.dtype == torch.float32
    reference = load_model(trained_model, device="cpu")
    for layer in reference.transformer.h:
        for name in LINEARS:
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, Fp8Linear.from_linear(layer.get_submodule(name)))
    reference.lm_head = Fp8Linear.from_linear(reference.lm_head)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
    prompt = [10, 20, 30, 40, 50]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 5:].tolist()
    assert LLMEngine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0] == hf


def test_tied_config_with_an_fp8_head_is_refused_in_one_line(fp8_quantized, tmp_path: Path):
    """An FP8 head cannot also be the (dense) embedding table: a config that ties them is refused, naming
    the field."""
    from telechat.model.loader import load_model

    folder = tmp_path / "tied"
    shutil.copytree(fp8_quantized("dynamic", head=True), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings") as e:
        load_model(folder, device="cpu")
    assert "\n" not in str(e.value)


def test_engine_generates_the_same_tokens_as_generate(fp8_quantized):
    """Greedy decoding through generate() and through the serving engine give the same tokens."""
    from telechat.engine.core import LLMEngine
    from telechat.engine.sampling import SamplingParams
    from telechat.model.loader import load_model

    model = load_model(fp8_quantized("dynamic"), device="cpu")
    prompt = [10, 20, 30, 40, 50]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 5:].tolist()
    assert LLMEngine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0] == hf


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_fused_fp8_projections_equal_the_separate_ones(fp8_quantized, activations):
    """Serving fuses FP8 query + key_value into qkv and gate + up into gate_up (rows and scales
    concatenated, K/V rows de-interleaved): the serving forward gives the unfused model's logits."""
    import copy

    from telechat.model.loader import load_model
    from tests.core.test_fused import one_sequence

    model = load_model(fp8_quantized(activations), device="cpu")
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    block = fused.transformer.h[0]
    assert isinstance(block.self_attention.qkv, Fp8Linear) and isinstance(block.mlp.gate_up, Fp8Linear)
    assert not hasattr(block.self_attention, "query")
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13])

    def serve(m):
        return m.forward_batch(ids, one_sequence(m, len(ids)))

    with torch.inference_mode():
        torch.testing.assert_close(serve(fused), serve(model), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(serve(model), model(ids[None]).logits[0].float(), atol=1e-4, rtol=1e-4)


def test_fp8_kv_cache_keeps_perplexity_within_half_a_percent(trained_model: Path, sft_file: Path):
    """On the trained test model, scoring held-out text through the engine's paged cache in FP8 instead of
    float32 changes perplexity by at most 0.5 % (issue budget), and by something (the cache is FP8)."""
    import math

    from jobs.quant.calib import load_heldout
    from telechat.chat_format import ChatFormat
    from telechat.model.loader import load_model
    from telechat.tokenizer import load_tokenizer
    from telechat.tools.perplexity import perplexity

    model = load_model(trained_model, device="cpu")
    chat = ChatFormat(load_tokenizer(trained_model), None)
    ids = load_heldout(sft_file, chat)[:4096]
    ppl = {kv: perplexity(model, ids, SEQ_LEN * 2, kv_cache_dtype=kv) for kv in ("auto", "fp8")}
    assert ppl["auto"] == pytest.approx(perplexity(model, ids, SEQ_LEN * 2), rel=1e-4)
    change = 100 * (ppl["fp8"] / ppl["auto"] - 1)
    assert ppl["fp8"] != ppl["auto"] and abs(change) <= 0.5, (ppl, change)
    assert math.isfinite(change)


@requires_compressed_tensors
def test_checkpoint_written_by_the_compressed_tensors_library_loads_identically(fp8_quantized, trained_model: Path,
                                                                                 tmp_path: Path):
    """A checkpoint compressed and saved by compressed-tensors (the writer llm-compressor uses; scales
    set by min-max, as llm-compressor's FP8_DYNAMIC observer does) holds byte-identical tensors to
    ours, and our loader loads it."""
    from telechat.model.loader import load_model

    theirs = _compress_with_library(trained_model, tmp_path / "llm-compressor-style", "FP8_DYNAMIC")
    ours = _tensors(fp8_quantized("dynamic"))
    written = _tensors(theirs)
    assert set(written) == set(ours) and all(_same(written[k], ours[k]) for k in ours)
    loaded = load_model(theirs, device="cpu")
    assert isinstance(loaded.transformer.h[1].mlp.down_proj, Fp8Linear)


@requires_compressed_tensors
def test_per_tensor_weight_scales_and_static_inputs_load(trained_model: Path, tmp_path: Path):
    """llm-compressor's FP8 preset (one weight scale per tensor, static per-tensor input scales), as the
    compressed-tensors library writes it, loads with the scalar scales broadcast: logits equal those of
    the same quantization built in memory."""
    from telechat.model.loader import load_model

    folder = _compress_with_library(trained_model, tmp_path / "fp8-per-tensor", "FP8", input_scale=0.05)
    loaded = load_model(folder, device="cpu")
    reference = load_model(trained_model, device="cpu")
    for layer in reference.transformer.h:
        for name in LINEARS:
            dense = layer.get_submodule(name)
            module = Fp8Linear.from_linear(dense, "static", input_scale=0.05)
            scale = dense.weight.detach().abs().amax() / FP8_MAX
            module.weight.copy_((dense.weight.detach() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
            module.weight_scale.fill_(scale.item())
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, module)
    assert loaded.transformer.h[0].mlp.up_proj.activations == "static"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


def _compress_with_library(source: Path, out: Path, preset: str, input_scale: float | None = None) -> Path:
    """``source`` quantized with compressed-tensors' ``preset`` (min-max weight scales, a fixed static
    input scale) and saved as llm-compressor saves: compress in place, save_pretrained, update config.json."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    from telechat.model.loader import load_model

    model = load_model(source, device="cpu")
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                per_row = module.weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
                module.weight_scale.copy_(per_row.clamp_min(1e-12) if module.weight_scale.shape[0] > 1
                                          else per_row.amax().reshape(1))
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(input_scale)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out


def test_sharded_writes_from_a_bin_checkpoint_load_like_one_file(tmp_path: Path):
    """The streaming writer reads a torch.save checkpoint (the official golden 7B-layout .bin), cuts
    shards at the size limit with a transformers index, and the sharded result loads to the same
    logits as the single-file one."""
    from jobs.quant.fp8 import INDEX_FILE, write_fp8_checkpoint
    from telechat.model.checkpoint import inspect_checkpoint
    from telechat.model.loader import load_model

    src = tmp_path / "bin"
    src.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(GOLDEN_DIR / "v7b" / name, src / name)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for out, limit in ((whole, 1 << 30), (sharded, 40_000)):
        out.mkdir()
        write_fp8_checkpoint(inspect_checkpoint(src), out, max_shard_bytes=limit)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert [p.name for p in whole.glob("*.safetensors")] == ["model.safetensors"]
    a, b = load_model(whole, device="cpu"), load_model(sharded, device="cpu")
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_option_errors_are_one_line(trained_model: Path, tmp_path: Path, caplog):
    """GPTQ settings with --method fp8, static scales without data and GPTQ without data exit with 2
    and one line each, leaving no output."""
    from jobs.quant.cli import main

    out = tmp_path / "never"
    cases = {
        ("--bits", "4"): "--bits 4 is a GPTQ setting",
        ("--group-size", "64"): "--group-size is a GPTQ setting",
        ("--activations", "static"): "--activations static needs --calib",
        ("--method", "gptq", "--quantize-head"): "--quantize-head is an fp8 setting",
    }
    for extra, message in cases.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(fp8_args(trained_model, out, *extra)) == 2
        [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert message in line and "\n" not in line
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["--model", str(trained_model), "--output", str(out)]) == 2
    assert "--method gptq needs --calib" in caplog.text
    assert not out.exists()


# ---- GPU (run on a machine with an sm89+ GPU) ---------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_scaled_mm_matches_dequantized_reference(bias, m, activations, dtype):
    """On CUDA, forward (torch._scaled_mm) equals the dequantized reference computed in float32 (the
    same quantized values: activations quantize identically from bf16/fp16 or their float32 copy) to
    the GEMM's bf16 output rounding, at 7B widths (K 4096, N 12288 / K 12288, N 4096)."""
    check_fp8_device("cuda")
    torch.manual_seed(0)
    for k, n in ((4096, 12288), (12288, 4096)):
        dense = nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        scale = x.abs().amax().item() / FP8_MAX if activations == "static" else None
        module = Fp8Linear.from_linear(dense, activations, input_scale=scale)
        out, ref = module(x), module.forward_reference(x.float())
        assert out.dtype == dtype and out.shape == (m, n)
        torch.testing.assert_close(out.float(), ref, atol=1e-3 * ref.abs().max().item(), rtol=1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_gpu_job_keeps_perplexity_within_one_percent(trained_model: Path, sft_file: Path, tmp_path: Path,
                                                     activations):
    """The job on CUDA (both models in bf16, the quantized one through FP8 GEMMs) stays within 1 % perplexity."""
    from jobs.quant.cli import main

    out = tmp_path / f"gpu-fp8-{activations}"
    argv = fp8_args(trained_model, out, "--activations", activations, "--dtype", "bfloat16", calib=sft_file)
    assert main([a if a != "cpu" else "cuda" for a in argv]) == 0
    report = json.loads((out / "quant_report.json").read_text())
    assert abs(report["ppl_change_pct"]) <= PPL_BUDGET_PCT, report
