"""Settings of every command that loads a model (``telechat chat`` / ``generate``; ``telechat serve``
extends them): one pydantic-settings model, from which flags and env names are derived
(``services/settings_cli.py``). The core itself reads no environment: callers pass these values.

The field types are shared (``Annotated``), so the API and the vLLM launcher declare the same
setting with the same type, description and flag.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from services.settings_cli import CliSettings
from telechat.model.config import ROPE_MODES, RopeMode

ModelPath = Annotated[str | None, Field(
    description="checkpoint folder; unset = the built-in demo model (built on first use)",
    json_schema_extra={"flags": ["--model"]})]
Dtype = Annotated[Literal["auto", "bfloat16", "float16", "float32"], Field(
    description="weights dtype; auto = bf16 on GPUs that support it, fp32 on CPU")]
KvCacheDtype = Annotated[Literal["auto", "fp8"], Field(
    description="KV cache element type: `auto` = the model's dtype, `fp8` = E4M3 (twice the tokens in the same "
    "memory; needs an Ada/Hopper GPU or the CPU)")]
MaxModelLen = Annotated[int | None, Field(ge=16, description="longest prompt + reply in tokens; "
                                          "unset = the checkpoint's seq_length")]
RopeModeSetting = Annotated[RopeMode | None, Field(
    description=f"RoPE policy past training_seqlen ({', '.join(ROPE_MODES)}); unset = the checkpoint's "
    "(ntk+scaling, the official behaviour)")]

# The server side, shared by ``telechat serve`` and the vLLM launcher (same flags and env names).
def _names(value: str | None) -> str | None:
    if value is None:
        return None
    names = split_names(value)
    if not names:
        return None
    if len(set(names)) != len(names):
        raise ValueError(f"the served model names repeat one: {', '.join(names)}")
    return ",".join(names)


def split_names(value: str | None) -> list[str]:
    """The names of a ``model_name`` setting (comma-separated; blanks dropped)."""
    return [n.strip() for n in (value or "").split(",") if n.strip()]


ModelName = Annotated[str | None, AfterValidator(_names), Field(
    description="served model id (/v1/models); several (comma-separated, or several flag values) = the first "
    "is the main id, the others aliases a request may name too; unset = the folder name, or telechat-demo for "
    "the demo model", json_schema_extra={"nargs": "+"})]
ApiHost = Annotated[str, Field(description="bind address; 0.0.0.0 = every interface",
                               json_schema_extra={"flags": ["--host"]})]
ApiPort = Annotated[int, Field(ge=0, le=65535, description="port", json_schema_extra={"flags": ["--port"]})]
ApiKey = Annotated[str | None, Field(description="bearer token required on model routes; unset = open")]
LoraModules = Annotated[str | None, Field(
    description="LoRA adapters that requests choose by their `model` field, batched with the base model: "
    "name=folder, several separated by commas or spaces (PEFT folders, as `telechat finetune --method lora` "
    "writes them)",
    json_schema_extra={"nargs": "+"})]


def parse_lora_modules(value: str | None) -> dict[str, str]:
    """``"a=/x,b=/y"`` (or spaces) → ``{"a": "/x", "b": "/y"}``; ``ValueError`` for an entry without a
    name or folder or a name given twice."""
    modules: dict[str, str] = {}
    for entry in (value or "").replace(",", " ").split():
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"{entry!r} is not name=folder")
        if name in modules:
            raise ValueError(f"the adapter name {name!r} is given twice")
        modules[name] = folder
    return modules


class ModelSettings(CliSettings):
    """How to load the model: flag > env (upper-case name) > default."""

    model_path: ModelPath = None
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Dtype = "auto"
    max_model_len: MaxModelLen = None
    rope_mode: RopeModeSetting = None
    training_seqlen: int | None = Field(None, ge=1, description="override the config's training_seqlen "
                                        "(set it to the length you fine-tuned at)")
    base_seqlen: int | None = Field(None, ge=1, description="override the NTK base length "
                                    "(v1: 4096 for the 7B layout, 8192 for the 12B layout)")
    lora_path: str | None = Field(None, description="LoRA adapter folder merged at load",
                                  json_schema_extra={"flags": ["--lora"]})
