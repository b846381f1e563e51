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

try:
    register()
except ModuleNotFoundError as _missing:
    # A web-only install (`.[web]`, no torch): `telechat web` must still start; commands that need
    # the model runtime report the missing extra themselves.
    if (_missing.name or "").split(".")[0] not in ("torch", "transformers"):
        raise
