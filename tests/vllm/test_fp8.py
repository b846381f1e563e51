"""Our FP8 checkpoints (``telechat quantize --method fp8``, compressed-tensors) serve in vLLM with the plugin
and reproduce our own FP8 model: greedy tokens and log-probabilities, 7B and 12B layouts, and the 7B with an
FP8 head (``--quantize-head``).

Static activation scales are not run here: vLLM's CPU FP8 kernel cannot apply a per-tensor input
scale with per-channel weight scales (it narrows the scale as if per token); GPUs use CUTLASS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.vllm.conftest import PROMPTS, Native

NEW_TOKENS = 8
TOP = 5
TOLERANCE = 2e-2
"""|vLLM − ours| per top log-probability: vLLM's per-token activation rounding may differ by an E4M3 step on a few
values (measured: 12B layout ≤ 2e-6, 7B ≤ 0.011)."""
HEAD_TOLERANCE = 6e-2
"""The same with the FP8 head, served dequantized by both: measured ≤ 0.050 (mean 0.005), against ≤ 0.075 (mean
0.023) for our FP8 head with its input quantized too, and ≤ 2.6 for the dense embeddings as the head."""


def _fp8_copy(src: Path, out: Path, head: bool) -> Path:
    """``src`` written as FP8 (dynamic activation scales; the head too with ``head``) by the quant job's
    writer, tokenizer beside it."""
    from jobs.output import copy_companions
    from jobs.quant.fp8 import write_fp8_checkpoint
    from telechat.model.checkpoint import inspect_checkpoint

    out.mkdir()
    write_fp8_checkpoint(inspect_checkpoint(src), out, head=head)
    copy_companions(src, out)
    return out


def _dequantized(head) -> torch.nn.Linear:
    """A dense Linear holding an Fp8Linear's weights, dequantized (what the plugin loads an FP8 head as)."""
    dense = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    dense.weight.data = head.weight.float() * head.weight_scale
    return dense


@pytest.fixture(scope="module", params=["7b", "12b", "7b-fp8-head"])
def pair(request, llm_factory, tmp_path_factory):
    """(native FP8 model, vLLM engine, native dense model, logprob tolerance) on the FP8 copy of one tiny
    checkpoint (tied 7B / untied 12B layout; the 7B with its head in FP8 too, which the plugin serves
    dequantized: the native reference gets the same dense head)."""
    from telechat.model.fp8 import Fp8Linear

    layout, _, head = request.param.partition("-")
    dense = request.getfixturevalue(f"tiny_{layout}")
    folder = _fp8_copy(dense, tmp_path_factory.mktemp("fp8") / request.param, head=bool(head))
    native = Native(folder)
    assert isinstance(native.model.lm_head, Fp8Linear) == bool(head)
    if head:
        native.model.lm_head = _dequantized(native.model.lm_head)
    return native, llm_factory(folder, max_logprobs=TOP), Native(dense), HEAD_TOLERANCE if head else TOLERANCE


def test_fp8_checkpoint_serves_with_our_greedy_tokens(pair):
    """vLLM picks its compressed-tensors FP8 scheme for our checkpoint; its greedy tokens equal our FP8
    model's and its top log-probabilities agree within the tolerance (same quantized weights), while the
    dense model's differ by more (the comparison sees the quantization)."""
    from vllm import SamplingParams

    from telechat.model.fp8 import Fp8Linear

    native, llm, dense, tolerance = pair
    assert llm.llm_engine.model_config.quantization == "compressed-tensors"
    assert isinstance(native.model.transformer.h[0].self_attention.key_value, Fp8Linear)
    prompts = [native.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == native.greedy(ids, NEW_TOKENS)
        reference = native.logprobs(ids + tokens)[len(ids) - 1:]
        unquantized = dense.logprobs(ids + tokens)[len(ids) - 1:]
        worst_dense = 0.0
        for row, entries in enumerate(out.outputs[0].logprobs):
            for token, logprob in entries.items():
                assert logprob.logprob == pytest.approx(reference[row, token].item(), abs=tolerance)
                worst_dense = max(worst_dense, abs(logprob.logprob - unquantized[row, token].item()))
        assert worst_dense > 5e-2, "vLLM's logprobs equal the dense model's: were the FP8 weights used?"
