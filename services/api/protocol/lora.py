"""Bodies of the LoRA adapter routes (vLLM's shapes: ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.api.protocol.fields import NonEmptyText

AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\s=]+$")]
"""An adapter's model id: what requests send as ``model`` (no spaces or ``=``, as in ``LORA_MODULES``)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class LoadLoraAdapterRequest(_Body):
    lora_name: AdapterName
    """The model id requests will use for the adapter."""
    lora_path: NonEmptyText
    """The adapter folder on the server (PEFT: adapter_config.json + adapter_model.safetensors)."""


class UnloadLoraAdapterRequest(_Body):
    lora_name: AdapterName
    # --- vLLM's optional lora_int_id is accepted and not used (names are unique here)


class UnloadedAdapter(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = Field(True, description="always true: the adapter is gone (OpenAI's model deletion shape)")
