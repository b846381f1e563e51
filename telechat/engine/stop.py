"""When a request ends: stop token ids, ``max_tokens`` and the request's ``max_len`` (docs/engine.md,
"One step"). Stop *strings* are text and belong to the API process."""

from __future__ import annotations

from telechat.engine.request import Request
from telechat.engine.sampling import SamplingParams


def is_stop_token(token: int, params: SamplingParams) -> bool:
    """``token`` ends the request ("stop"): one of its stop token ids, unless it ignores them."""
    return not params.ignore_eos and token in params.stop_token_ids


def length_reached(num_output_tokens: int, num_tokens: int, params: SamplingParams, max_len: int) -> bool:
    """A request with these counts may not grow ("length"): ``max_tokens`` outputs or ``max_len`` tokens."""
    return num_output_tokens >= params.max_tokens or num_tokens >= max_len


def finish_reason(request: Request) -> str | None:
    """Why ``request`` ends now that a token was appended to its ``output_ids``: "stop", "length" or
    None. Placeholders (tokens still on the device) do not count: they are read later."""
    if is_stop_token(request.output_ids[-1], request.params):
        return "stop"
    if length_reached(len(request.output_ids), request.num_known_tokens, request.params, request.max_len):
        return "length"
    return None


def out_of_room(request: Request) -> bool:
    """Counting placeholders, ``request`` already has every token it may get: sampling another one
    would go past ``max_tokens`` or ``max_len``, so it is not scheduled (it ends when they are read)."""
    return length_reached(len(request.output_ids) + request.num_placeholders, request.num_tokens,
                          request.params, request.max_len)
