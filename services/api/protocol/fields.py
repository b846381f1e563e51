"""Field types shared by the request schemas: text that is valid Unicode, 64-bit seeds.

JSON may carry a lone UTF-16 surrogate (``"\\ud800"``); Python's parser turns it into a ``str``
that cannot be encoded as UTF-8, so it would fail deep inside the tokenizer. :data:`Text` refuses it
at the edge with a 400 that says so.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate ({value[e.start]!r} at character {e.start}); "
                         "send valid Unicode (UTF-16 surrogates only come in pairs)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A string that encodes as UTF-8."""

NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
"""A :data:`Text` of at least one character."""

Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""A seed in the signed 64-bit range (what torch generators and OpenAI clients use)."""
