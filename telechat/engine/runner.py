"""Model runner: one forward pass over a flat batch of decode tokens and prefill chunks.

Linear layers see all tokens of the step at once (``[T, H]``); attention is per sequence through
the paged KV cache (:class:`~telechat.engine.kv_cache.StepAttention`). Each sequence carries its
own RoPE parameters, fixed when it was first prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from telechat.engine.kv_cache import PagedKVCache, PrefillChunk, StepAttention
from telechat.rope import RopeParams, cos_sin, inv_freq


@dataclass
class StepInput:
    """What one sequence contributes to a step: tokens at positions ``[start, start+len(tokens))``."""

    tokens: list[int]
    start: int
    blocks: list[int]
    rope: RopeParams


class ModelRunner:
    """Runs :class:`~telechat.modeling.TelechatForCausalLM` weights over the paged cache."""

    def __init__(self, model, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.head_dim = model.config.head_dim

    @torch.inference_mode()
    def forward(self, decodes: list[StepInput], prefills: list[StepInput]) -> torch.Tensor:
        """Logits ``[len(decodes) + len(prefills), V]`` at the last token of each input, decodes first."""
        dev = self.device
        inputs = decodes + prefills
        tokens, positions, write_slots, freqs, mscales, last_rows = [], [], [], [], [], []
        chunks: list[PrefillChunk] = []
        row = 0
        for i, inp in enumerate(inputs):
            n = len(inp.tokens)
            end = inp.start + n
            tokens.extend(inp.tokens)
            positions.append(torch.arange(inp.start, end))
            write_slots.append(self.cache.slots(inp.blocks, inp.start, end, "cpu"))
            f = inv_freq(inp.rope.base, self.head_dim)
            freqs.append(f.expand(n, -1))
            mscales.append(torch.full((n,), inp.rope.mscale))
            if i >= len(decodes):
                ctx = self.cache.slots(inp.blocks, 0, end, dev) if inp.start else None
                chunks.append(PrefillChunk(row=row, start=inp.start, end=end, context_slots=ctx))
            row += n
            last_rows.append(row - 1)
        pos = torch.cat(positions).to(dev)
        cos, sin = cos_sin(pos, torch.cat(freqs).to(dev), torch.cat(mscales).to(dev), self.dtype)
        dec_slots = dec_mask = None
        if decodes:
            lens = [d.start + 1 for d in decodes]
            lmax = max(lens)
            dec_slots = torch.zeros(len(decodes), lmax, dtype=torch.long)
            for j, d in enumerate(decodes):
                dec_slots[j, : lens[j]] = self.cache.slots(d.blocks, 0, lens[j], "cpu")
            dec_slots = dec_slots.to(dev)
            dec_mask = (torch.arange(lmax)[None, :] < torch.tensor(lens)[:, None]).to(dev)[:, None, None, :]
        step = StepAttention(
            cache=self.cache, write_slots=torch.cat(write_slots).to(dev), decode_rows=len(decodes),
            decode_slots=dec_slots, decode_mask=dec_mask, prefills=chunks,
        )
        t = self.model.transformer
        x = t.word_embeddings(torch.tensor(tokens, device=dev))
        if t.word_embeddings_layernorm is not None:
            x = t.word_embeddings_layernorm(x)
        for block in t.h:
            x = block(x, cos, sin, None, step)
        x = t.ln_f(x[torch.tensor(last_rows, device=dev)])
        return self.model.lm_head(x).float()
