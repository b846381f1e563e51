"""TeleChat Stack core: native TeleChat model, tokenizers, chat format and serving engine.

Importing the package registers the TeleChat config, model and tokenizers with transformers'
Auto classes, so official checkpoint folders load with no ``trust_remote_code``.
"""

from telechat.registry import register

__version__ = "0.1.0"

register()
