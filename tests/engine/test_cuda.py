"""CUDA fast path checks (Triton paged attention, CUDA graphs). Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from telechat.model.config import TelechatConfig
from telechat.engine.engine import EngineConfig, LLMEngine
from telechat.engine.paged_attention import _gather_decode, paged_decode_attention, partition_size
from telechat.engine.runner import StepInput
from telechat.engine.sampling import SamplingParams
from telechat.model.modeling import TelechatForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("n_kv, d", [(4, 128), (2, 160), (8, 64)])
def test_triton_paged_attention_matches_gather(n_kv, d):
    """The Triton kernel equals gather + SDPA on random paged data (head_dim 160 = 12B included)."""
    torch.manual_seed(0)
    bsz, heads, bs, max_len = 5, 8, 16, 3000
    blocks = bsz * math.ceil(max_len / bs) + 1
    kc = torch.randn(blocks * bs, n_kv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = (torch.randperm(blocks - 1, device="cuda")[: bsz * math.ceil(max_len / bs)] + 1).view(bsz, -1).int()
    lens = torch.tensor([1, 17, 500, 2999, 3000], device="cuda", dtype=torch.int32)
    q = torch.randn(bsz, heads, d, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, kc, vc, table, lens, bs, partition_size(max_len))
    ref = _gather_decode(q.float(), kc.float(), vc.float(), table, lens, bs)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def _model(dtype):
    torch.manual_seed(0)
    cfg = TelechatConfig(vocab_size=512, hidden_size=256, n_layer=2, n_head=4, ffn_hidden_size=512,
                         training_seqlen=64, seq_length=1024, initializer_range=0.1)
    return TelechatForCausalLM(cfg).to("cuda", dtype).eval()


def test_graph_engine_greedy_matches_generate_fp32():
    """CUDA-graph decode (fp32) reproduces transformers generate() token for token, past training_seqlen."""
    model = _model(torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (5, 40, 90)]
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4))
    assert engine.runner.graphs, "graphs were not captured"
    out = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0))
    for p, o in zip(prompts, out):
        ref = model.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=30, eos_token_id=None,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"))
        assert o == ref[0, len(p):].tolist()


def test_bf16_decode_logits_close_to_reference():
    """bf16 logits of graph decode steps stay within tolerance of a full bf16 forward."""
    model = _model(torch.bfloat16)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2))
    prompt = list(range(10, 60))
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    seq = prompt + out
    rope = model.transformer.rotary.params(len(prompt))
    blocks = engine.allocator.allocate(math.ceil(len(seq) / engine.cache.block_size))
    runner = engine.runner
    runner.forward([], [StepInput(seq[:-1], 0, blocks, rope)])
    logits = runner.forward([StepInput([seq[-1]], len(seq) - 1, blocks, rope)], [])[0]
    with torch.inference_mode():
        ref = model(torch.tensor([seq], device="cuda"), use_cache=False, rope_length=len(prompt)).logits[0, -1].float()
    assert (logits - ref).norm() / ref.norm() < 2e-2
