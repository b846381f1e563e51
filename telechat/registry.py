"""Registration of TeleChat classes with transformers' Auto classes (idempotent)."""

from __future__ import annotations

_done = False


def register() -> None:
    """Register config + causal LM for ``model_type`` telechat/telechat2 (and tokenizers when present)."""
    global _done
    if _done:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from telechat.model.config import Telechat2Config, TelechatConfig
    from telechat.model.modeling import Telechat2ForCausalLM, TelechatForCausalLM

    for cfg, model in ((TelechatConfig, TelechatForCausalLM), (Telechat2Config, Telechat2ForCausalLM)):
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, model, exist_ok=True)
    from telechat.tokenizer import register_tokenizers  # after the config, which the tokenizers key on

    register_tokenizers()
    _done = True
