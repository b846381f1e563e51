"""One settings schema per component (services/settings_cli.py): flags, env names, ``--help``, the
precedence flag > env > file > default, one-line errors, and .env / compose.yaml kept in step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Literal

import pytest
import yaml
from pydantic import Field

from services import settings_cli
from services.settings_cli import CliSettings, SettingsError
from tests.conftest import REPO


class Toy(CliSettings):
    api_port: int = Field(8070, ge=1, description="port", json_schema_extra={"flags": ["--port"]})
    mode: Literal["a", "b"] = "a"
    gpus: str | None = Field(None, json_schema_extra={"flags": ["--gpu"], "env": "CUDA_VISIBLE_DEVICES"})


def _models() -> dict[str, type]:
    from deploy_settings import Settings as DeploySettings
    from services.api.settings import Settings as ApiSettings
    from services.web.settings import WebSettings
    from telechat.settings import ModelSettings
    from telechat.vllm_plugin.serve import VllmServeSettings

    return {"api": ApiSettings, "web": WebSettings, "chat": ModelSettings, "vllm": VllmServeSettings,
            "deploy": DeploySettings}


def _help(component: str, capsys) -> str:
    import deploy
    from services.api.main import parse_settings
    from services.web.launch import main as web_main
    from telechat.tools.chat_cli import generate_main
    from telechat.vllm_plugin.serve import parse_args as vllm_parse

    entry = {"api": parse_settings, "web": web_main, "chat": generate_main, "vllm": vllm_parse,
             "deploy": deploy.parse_args}[component]
    with pytest.raises(SystemExit) as done:
        entry(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("component", ["api", "web", "chat", "vllm", "deploy"])
def test_help_lists_every_field_with_its_flag_and_env(component, capsys):
    text = " ".join(_help(component, capsys).split())
    model = _models()[component]
    for name, field in model.model_fields.items():
        flag, env = settings_cli.flags_of(name, field)[0], settings_cli.env_name(name, field)
        assert re.search(rf"{re.escape(flag)}[ ,]", text), f"{component}: {flag} missing from --help"
        assert f"[env {env}" in text, f"{component}: env {env} missing from --help"


def test_precedence_flag_over_env_over_file_over_default():
    parser = settings_cli.build_parser(Toy, prog="toy", description="")
    load = settings_cli.load
    assert load(Toy, parser.parse_args([]), environ={}) == Toy()
    assert load(Toy, parser.parse_args([]), environ={}, file_values={"api_port": 1}).api_port == 1
    assert load(Toy, parser.parse_args([]), environ={"API_PORT": "2"}, file_values={"api_port": 1}).api_port == 2
    assert load(Toy, parser.parse_args(["--port", "3"]), environ={"API_PORT": "2"},
                file_values={"api_port": 1}).api_port == 3
    assert load(Toy, parser.parse_args([]), environ={"API_PORT": " "}, file_values={"api_port": ""}).api_port == 8070
    assert load(Toy, parser.parse_args(["--gpu", "1"]), environ={"CUDA_VISIBLE_DEVICES": "0"}).gpus == "1"
    assert load(Toy, parser.parse_args([]), environ={"CUDA_VISIBLE_DEVICES": "0"}).gpus == "0"
    with pytest.raises(SettingsError, match="unknown key 'api_prot'; valid keys: api_port, mode, gpus"):
        load(Toy, parser.parse_args([]), environ={}, file_values={"api_prot": 1})


def test_component_models_read_their_env_names(monkeypatch):
    from services.api.main import parse_settings

    monkeypatch.setenv("API_PORT", "9001")
    monkeypatch.setenv("ROPE_MODE", "ntk")
    monkeypatch.setenv("SHUTDOWN_GRACE_S", "3")
    s = parse_settings(["--port", "9002", "--lora", "/a", "--model", "/m"])
    assert (s.api_port, s.rope_mode, s.shutdown_grace_s, s.lora_path, s.model_path) == (9002, "ntk", 3, "/a", "/m")
    assert parse_settings(["--metrics-require-key"]).metrics_require_key is True
    assert settings_cli.to_env(parse_settings([]))["API_PORT"] == "9001"


@pytest.mark.parametrize("argv, env, needles", [
    (["-m", "telechat.cli", "serve"], {"API_PORT": "http"}, ["--port", "API_PORT", "'http'"]),
    (["-m", "telechat.cli", "generate", "--prompt", "x", "--rope-mode", "ntk2"], {},
     ["--rope-mode", "ROPE_MODE", "'ntk2'"]),
    (["-m", "services.web", "--port", "0"], {}, ["--port", "WEB_PORT"]),
    (["-m", "telechat.vllm_plugin.serve"], {"TENSOR_PARALLEL_SIZE": "0"},
     ["--tensor-parallel-size", "TENSOR_PARALLEL_SIZE"]),
    ([str(REPO / "deploy.py"), "--no-install"], {"CUDA_VISIBLE_DEVICES": "0", "API_PORT": "-1"},
     ["--api-port", "API_PORT"]),
])
def test_a_bad_value_is_one_line_naming_flag_and_env(argv, env, needles):
    environ = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "API_PORT", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env={**environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: invalid "), done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0]


def _compose_environment(service: str) -> dict[str, str]:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    return compose["services"][service]["environment"]


@pytest.mark.parametrize("component, services", [("api", ["api"]), ("web", ["web", "web-vllm"]),
                                                 ("vllm", ["vllm"])])
def test_env_file_documents_and_compose_passes_every_setting(component, services):
    """.env names every setting (a value line, or a comment for those compose fixes inside the container),
    and each container gets every setting of its component."""
    env_text = (REPO / ".env").read_text(encoding="utf-8")
    names = settings_cli.env_names(_models()[component]).values()
    undocumented = [n for n in names if not re.search(rf"^{n}=|^#.*\b{n}\b", env_text, re.M)]
    assert not undocumented, f".env does not document {undocumented}"
    for service in services:
        missing = sorted(set(names) - set(_compose_environment(service)))
        assert not missing, f"compose.yaml {service}.environment lacks {missing}"


def test_vllm_launcher_passes_the_shared_engine_settings(tmp_path):
    """KV_CACHE_DTYPE (and the other settings vLLM takes as they are) reach vLLM's command line with its
    flags, from the same env names as our API's; a value vLLM would not take is refused here."""
    from telechat.vllm_plugin.serve import parse_args, vllm_argv

    settings, extra = parse_args(["--max-model-len", "4096", "--", "--enforce-eager"], {"KV_CACHE_DTYPE": "fp8"})
    argv = vllm_argv(settings, "telechat", tmp_path, tmp_path / "t.jinja", extra)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8" and argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[-1] == "--enforce-eager"
    assert parse_args([], {})[0].kv_cache_dtype == "auto"
    with pytest.raises(SettingsError, match="KV_CACHE_DTYPE"):
        parse_args([], {"KV_CACHE_DTYPE": "int4"})
