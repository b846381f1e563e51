"""Schemas of the official TeleChat service (docs/legacy-api.md), kept field for field.

Request: ``dialog`` (required, roles ``user`` at even and ``bot`` at odd positions, ending with the
user's question) and optional sampling values with the official defaults and ranges, strictly
typed (an int ``1`` where a float is expected is a range error, as in the official service).

Errors keep the official body ``{"seqid", "code", "message", "flag", "data"}`` and codes; unlike
the official service (always HTTP 200) they come with a real status: 400 for 10301/10904/10305,
429 / 503 / 500 with 10903 for overload / loading / a failed generation. ``detail`` (not in the
official body) says what exactly is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from services.api.protocol.fields import Text
from services.api.protocol.openai import MIN_TEMPERATURE

if TYPE_CHECKING:
    from telechat.engine.sampling import SamplingParams

MISSING, DIALOG, RANGE, FAILED = 10301, 10904, 10305, 10903
MESSAGES = {MISSING: "服务必填参数缺失", DIALOG: "服务请求参数dialog错误", RANGE: "请求参数范围错误", FAILED: "服务执行失败"}


class LegacyError(Exception):
    """An error answered in the official body with an official code and a real HTTP status."""

    def __init__(self, code: int, detail: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.code, self.detail, self.status, self.headers = code, detail, status, headers

    def body(self) -> dict:
        """The official error body with our ``detail``."""
        return LegacyErrorBody(code=self.code, message=MESSAGES[self.code], detail=self.detail).model_dump()


def code_for(loc: tuple, error_type: str) -> int:
    """Official code of a validation error at ``loc`` (``("body", field, ...)``)."""
    if len(loc) < 2 or error_type == "json_invalid":  # no readable body at all
        return MISSING
    if loc[1] != "dialog":
        return RANGE
    return MISSING if len(loc) == 2 and error_type in ("missing", "too_short") else DIALOG


class DialogTurn(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["user", "bot"]
    content: Text


_EXAMPLE = {"dialog": [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！有什么可以帮你？"},
                       {"role": "user", "content": "请介绍一下北京。"}],
            "do_sample": True, "top_p": 0.1, "temperature": 0.1, "repetition_penalty": 1.03}


class DialogRequest(BaseModel):
    """Body of ``/telechat/gptDialog/v2`` and ``/v4``; defaults are the official service's."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False,
                              json_schema_extra={"examples": [_EXAMPLE]})

    dialog: list[DialogTurn] = Field(min_length=1)
    do_sample: StrictBool = True
    max_length: Annotated[StrictInt, Field(gt=0, le=4096)] = 4096
    """Prompt + reply tokens, as in the official chat() (the prompt is truncated to fit)."""
    top_k: Annotated[StrictInt, Field(gt=0, lt=100)] = 20
    top_p: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.2
    temperature: Annotated[StrictFloat, Field(ge=MIN_TEMPERATURE, lt=1)] = 0.1
    """(0, 1) officially; values below 0.001 overflow the logits, so they are refused."""
    repetition_penalty: Annotated[StrictFloat, Field(gt=1, lt=100)] = 1.03

    @field_validator("dialog")
    @classmethod
    def _roles(cls, dialog: list[DialogTurn]) -> list[DialogTurn]:
        for i, turn in enumerate(dialog):
            expected = "user" if i % 2 == 0 else "bot"
            if turn.role != expected:
                raise ValueError(f"dialog[{i}].role must be {expected!r} (user and bot alternate, user first), "
                                 f"got {turn.role!r}")
        if len(dialog) % 2 == 0:
            raise ValueError("the dialog must end with the user's question (an odd number of turns)")
        return dialog

    def messages(self) -> list[dict[str, str]]:
        """The dialog as chat-format messages."""
        return [{"role": t.role, "content": t.content} for t in self.dialog]

    def to_sampling_params(self, defaults: Callable[..., SamplingParams], max_tokens: int) -> SamplingParams:
        """Engine parameters; ``do_sample=False`` is greedy whatever the other values (HF semantics)."""
        if not self.do_sample:
            return defaults(max_tokens=max_tokens, temperature=0.0, top_k=0, top_p=1.0,
                            repetition_penalty=self.repetition_penalty)
        return defaults(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        repetition_penalty=self.repetition_penalty)


class LegacyErrorBody(BaseModel):
    """The official error body (``detail`` is ours: what exactly is wrong)."""

    seqid: str = ""
    code: int
    message: str
    flag: str = "0"
    data: str = "执行失败"
    detail: str


class DialogReply(BaseModel):
    """``/v4`` answer: the reply string as ``content`` (the official service returned a tuple here)."""

    role: str = "bot"
    content: str
