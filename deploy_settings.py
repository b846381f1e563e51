"""Settings of ``deploy.py``: one pydantic-settings model; its flags, env names and the keys of
``deploy_config.yaml`` are derived from the fields (``services/settings_cli.py``).

Imported by ``deploy.py`` only after its bootstrap (this needs pydantic; ``deploy.py`` itself is stdlib).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.settings_cli import CliSettings

Backend = Literal["native", "vllm"]


class Settings(CliSettings):
    """What the launcher starts; each field is a key of deploy_config.yaml."""

    model_path: str | None = Field(
        None, description="checkpoint folder; unset = the built-in demo model (built on first use); "
        "in the config file, relative to the file", json_schema_extra={"flags": ["--model-path", "--model"]})
    api_host: str = Field("0.0.0.0", description="API bind address; 0.0.0.0 = every interface, "
                          "127.0.0.1 = this machine only")
    api_port: int = Field(8070, ge=1, le=65535, description="API port")
    web_host: str = Field("0.0.0.0", description="web UI bind address")
    web_port: int = Field(8501, ge=1, le=65535, description="web UI port")
    gpu_devices: str | None = Field(
        None, description="GPUs for the services, e.g. 0 or 0,1, passed on as CUDA_VISIBLE_DEVICES; "
        "unset = every visible GPU", json_schema_extra={"flags": ["--gpu"], "env": "CUDA_VISIBLE_DEVICES"})
    backend: Backend = Field("native", description="inference server on the API port: native (our engine) or "
                             "vllm (vLLM + the TeleChat plugin, README 'vLLM backend')")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs each pipeline stage is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm backend: pipeline stages (layers split over "
                                        "GPUs or, with Ray, over machines)")
