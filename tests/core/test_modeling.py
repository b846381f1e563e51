"""Model equivalences and checkpoint layouts on tiny random configs (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import telechat  # noqa: F401
from telechat.model.checkpoint import CheckpointError
from telechat.model.loader import load_model
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM


def tiny(**kw) -> TelechatConfig:
    base = dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=96, training_seqlen=32,
                seq_length=256, architectures=["TelechatForCausalLM"])
    return TelechatConfig(**{**base, **kw})


def make(seed=0, **kw) -> TelechatForCausalLM:
    torch.manual_seed(seed)
    model = TelechatForCausalLM(tiny(**kw)).eval()
    with torch.no_grad():  # random norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 2}, {"tie_word_embeddings": False}],
                         ids=["mha", "gqa", "untied"])
def test_cached_decode_equals_full_forward(kw):
    """Prefill + one-token cached steps give the logits of a single pass with the same RoPE length."""
    model = make(**kw)
    ids = torch.randint(0, 300, (1, 40))  # past training_seqlen (32): NTK alpha and mscale are active
    with torch.inference_mode():
        full = model(ids, use_cache=False, rope_length=24).logits[0]
        out = model(ids[:, :24], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits[0, -1]]
        for t in range(24, 40):
            out = model(ids[:, t : t + 1], cache=cache) if hasattr(out, "cache") else \
                model(ids[:, t : t + 1], past_key_values=cache)
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps[:-1]), full[23:39], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("tq, tk", [(7, 7), (5, 19), (1, 9)])
def test_causal_attention_is_aligned_at_the_bottom_right(heads, kv_heads, tq, tk):
    """``causal`` lets query i see keys 0 .. Tk - Tq + i: the last Tq positions of a Tk-long causal pass."""
    from telechat.model.attention import attention

    torch.manual_seed(0)
    q = torch.randn(2, heads, tk, 16)
    k, v = torch.randn(2, kv_heads, tk, 16), torch.randn(2, kv_heads, tk, 16)
    full = attention(q, k, v, causal=True)
    torch.testing.assert_close(attention(q[:, :, tk - tq:], k, v, causal=True), full[:, :, tk - tq:])
    with pytest.raises(ValueError, match="mask or causal"):
        attention(q, k, v, causal=True, mask=torch.ones(1, 1, tk, tk, dtype=torch.bool))


def test_cached_chunk_equals_full_forward():
    """A multi-token chunk after cached positions (chunked prefill through the transformers cache) gives the
    logits of one pass."""
    model = make()
    ids = torch.randint(0, 300, (1, 30))
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits[0]
        out = model(ids[:, :12], use_cache=True)
        chunk = model(ids[:, 12:], past_key_values=out.past_key_values).logits[0]
    torch.testing.assert_close(chunk, full[12:], rtol=1e-4, atol=1e-5)


def test_batched_left_padding_matches_single():
    """Left-padded batch rows give the same last logits as each row alone."""
    model = make()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 7))
    batch = torch.cat([a, torch.cat([torch.full((1, 5), 3), b], 1)])
    mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
    with torch.inference_mode():
        both = model(batch, attention_mask=mask, use_cache=False).logits[:, -1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        both_pos = model(batch, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        alone = [model(x, use_cache=False).logits[0, -1] for x in (a, b)]
    torch.testing.assert_close(both[0], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both_pos[1], alone[1], rtol=1e-4, atol=1e-5)


def test_packed_rows_do_not_attend_across_samples():
    """Position ids restarting at 0 inside a row isolate the packed samples (fine-tune packing)."""
    model = make()
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 6))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.inference_mode():
        logits = model(packed, position_ids=pos, use_cache=False, rope_length=32).logits[0]
        la = model(a, use_cache=False, rope_length=32).logits[0]
        lb = model(b, use_cache=False, rope_length=32).logits[0]
    torch.testing.assert_close(logits[:9], la, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[9:], lb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_close_to_fp32(dtype):
    """bf16 and fp16 forward passes work and stay close to fp32."""
    model = make()
    ids = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        ref = model(ids, use_cache=False).logits
        low = model.to(dtype)(ids, use_cache=False).logits.float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() / ref.abs().max() < 0.05


def test_save_pretrained_writes_official_names(tmp_path):
    """Saved keys are the official 12B names; a 7B-layout copy (no prefix, tied) loads to the same model."""
    model = make(tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "12b")
    keys = set(load_file(tmp_path / "12b" / "model.safetensors"))
    assert "lm_head.weight" in keys and "transformer.h.0.self_attention.key_value.weight" in keys
    assert all(k == "lm_head.weight" or k.startswith("transformer.") for k in keys)
    tied = make(seed=1)
    tied.save_pretrained(tmp_path / "tied")
    state = load_file(tmp_path / "tied" / "model.safetensors")
    seven = tmp_path / "7b"
    seven.mkdir()
    save_file({k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"},
              seven / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)  # the 7B config does not carry the key (HF default: tied)
    (seven / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(seven)
    ids = torch.randint(0, 300, (1, 10))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, tied(ids).logits)
    assert loaded.config.base_seqlen == 4096


def test_sharded_index_loads(tmp_path):
    """A sharded safetensors checkpoint with an index loads through AutoModelForCausalLM."""
    model = make(tie_word_embeddings=False)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 8))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_official_configs_parse(tmp_path):
    """The released 7B/12B/12B-V2 configs parse with their official keys and the NTK base rule."""
    from tests.conftest import REF

    expect = {"7B": (4096, 128, True, 30), "12B": (8192, 160, False, 38), "12B-V2": (8192, 160, False, 38)}
    for name, (base, head_dim, tied, layers) in expect.items():
        cfg = AutoConfig.from_pretrained(REF / "configs" / name)
        assert (cfg.base_seqlen, cfg.head_dim, cfg.tie_word_embeddings, cfg.num_hidden_layers) == \
            (base, head_dim, tied, layers)
    t2 = tiny(base_seqlen=8192, num_key_value_heads=2, architectures=["TeleChat2ForCausalLM"])
    assert t2.base_seqlen == 8192 and t2.num_key_value_heads == 2


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "could not read the weights"),
    (lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'),
     "LlamaForCausalLM"),
])
def test_broken_checkpoints_give_clear_errors(tmp_path, break_it, message):
    """Missing or corrupt files raise CheckpointError naming the problem."""
    make().save_pretrained(tmp_path)
    break_it(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_missing_shard_named(tmp_path):
    """A shard listed in the index but absent is named in the error."""
    make(tie_word_embeddings=False).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path)
