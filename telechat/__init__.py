"""TeleChat Stack core: native TeleChat model, tokenizers, chat format and serving engine.

Importing the package registers the TeleChat config, model and tokenizers with transformers'
Auto classes, so official checkpoint folders load with no ``trust_remote_code``.
"""

import logging

# torchao (pulled in by the quant extra) logs a warning per missing optional CUDA kernel and torch
# warns about its Enum registration at every import: noise on CPU installs, silenced here.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from telechat.registry import register  # noqa: E402

__version__ = "0.1.0"

register()

from telechat.tokenizer import register_tokenizers  # noqa: E402  (after the config is registered)

register_tokenizers()
