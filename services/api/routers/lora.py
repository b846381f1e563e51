"""LoRA adapters loaded and unloaded at run time (vLLM's routes): the adapter then appears in (or leaves)
``/v1/models`` and requests name it in ``model``. The engine core reads the folder (docs/engine.md,
Batched LoRA); a bad folder, name or rank is a 400, an unknown name to unload a 404."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.deps import RuntimeDep, require_api_key
from services.api.protocol.lora import LoadLoraAdapterRequest, UnloadedAdapter, UnloadLoraAdapterRequest
from services.api.protocol.openai import APIError, ErrorResponse, ModelCard
from services.api.routers.openai import model_card

router = APIRouter(prefix="/v1", tags=["LoRA adapters"], dependencies=[Depends(require_api_key)],
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 503)})


@router.post("/load_lora_adapter", response_model=ModelCard)
async def load_lora_adapter(body: LoadLoraAdapterRequest, rt: RuntimeDep) -> ModelCard:
    """Load a PEFT LoRA adapter folder under ``lora_name``; answers its model card."""
    if not rt.engine.info.max_loras:
        raise APIError(400, "this server serves no per-request LoRA adapters; start it with --enable-lora "
                       "(ENABLE_LORA=true) or --lora-modules", code="lora_disabled")
    if body.lora_name == rt.name or body.lora_name in rt.engine.lora_adapters:
        raise APIError(400, f"the model id {body.lora_name!r} is already in use; unload it first or pick another "
                       "lora_name", param="lora_name", code="lora_name_in_use")
    try:
        await rt.engine.load_lora_adapter(body.lora_name, body.lora_path)
    except ValueError as e:
        raise APIError(400, str(e), param="lora_path", code="invalid_lora_adapter") from None
    return model_card(rt, body.lora_name, body.lora_path)


@router.post("/unload_lora_adapter", response_model=UnloadedAdapter)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, rt: RuntimeDep) -> UnloadedAdapter:
    """Unload the adapter ``lora_name``: new requests cannot name it, running ones finish with it."""
    try:
        await rt.engine.unload_lora_adapter(body.lora_name)
    except KeyError:
        raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded (see GET /v1/models)",
                       param="lora_name", code="model_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), param="lora_name") from None
    return UnloadedAdapter(id=body.lora_name)
