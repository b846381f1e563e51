"""The one checkpoint export of every path (full SFT with or without ZeRO-2/3, LoRA merge, merge-lora).

Input is a full state dict in our (= official 12B) parameter names, however it was gathered; the
output is the same for all: a tied head is not stored (the official 7B layout, which every loader
ties back), ``use_cache`` is on again (training turns it off), ``dtype`` names the stored dtype,
safetensors shards as ``save_pretrained`` names them, plus the source's tokenizer files,
generation_config.json and remote code. Written through :func:`jobs.output.staged`: atomic,
umask-respecting, never deleting what it did not write.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from jobs.output import copy_companions, staged

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "50GB"
"""transformers' ``save_pretrained`` default: 7B and 12B in bf16 stay one ``model.safetensors``."""


def export_checkpoint(state_dict: dict[str, torch.Tensor], config, output: Path, *, dtype: torch.dtype | None = None,
                      companions: Sequence[Path] = (), generation_ids: dict[str, int] | None = None) -> Path:
    """Write ``state_dict`` + ``config`` as a TeleChat checkpoint folder ``output``; returns ``output``.

    ``dtype`` casts the floating tensors (default: keep them). ``companions`` are folders whose
    tokenizer files, generation_config.json and ``*.py`` are copied (later ones win);
    ``generation_ids`` writes a generation_config.json for a model that has none (random init).
    """
    config = copy.deepcopy(config)
    tensors = {k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
               for k, v in state_dict.items()
               if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    config.use_cache = True
    config.dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    with staged(Path(output)) as tmp:
        save_torch_state_dict(tensors, tmp, max_shard_size=MAX_SHARD_SIZE, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for folder in dict.fromkeys(companions):
            copy_companions(folder, tmp)
        if generation_ids is not None:
            write_generation_config(tmp, generation_ids)
    log.info("wrote %s (%d tensors, %s)", output, len(tensors), str(config.dtype).removeprefix("torch."))
    return Path(output)


def write_generation_config(dest: Path, ids: dict[str, int]) -> None:
    """A generation_config.json for a model with no source one (``--from-scratch``): the chat
    marker ids the official code reads, greedy decoding."""
    config = {"do_sample": False, "use_cache": True, **ids}
    (dest / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
