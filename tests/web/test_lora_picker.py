"""The model picker lists the LoRA adapters a server offers (read from ``/v1/models`` over HTTP), each named
with its base model, and picks them by id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from services.web.client import APIClient
from services.web.settings import get_settings
from services.web.store import close_shared
from tests.api.test_lora_adapters import make_adapter

APP = Path(__file__).resolve().parents[2] / "services/web/app.py"


@pytest.fixture(scope="module")
def lora_api(demo_model_dir, api_server, tmp_path_factory):
    folder = make_adapter(demo_model_dir, tmp_path_factory.mktemp("web-lora") / "sql", 0, ["query", "dense"])
    return api_server(demo_model_dir, "--lora-modules", f"sql={folder}")


def test_client_reads_each_adapter_with_its_base(lora_api) -> None:
    models = APIClient(lora_api.url).models()
    assert [(m.id, m.parent) for m in models] == [(models[0].id, None), ("sql", models[0].id)]
    assert models[1].max_model_len == models[0].max_model_len


@pytest.fixture
def lora_page(lora_api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AppTest]:
    import streamlit as st

    for name in ("DATABASE_URL", "WEB_AUTH", "WEB_SESSION_TTL_H", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("API_URL", lora_api.url)
    monkeypatch.setenv("WEB_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    close_shared()
    st.cache_data.clear()
    st.cache_resource.clear()
    yield AppTest.from_file(str(APP), default_timeout=30).run()
    close_shared()
    get_settings.cache_clear()


def test_picker_lists_the_adapter_under_its_base(lora_page: AppTest) -> None:
    at = lora_page  # the default language, Chinese
    picker = at.selectbox(key="model")
    base = picker.options[0]
    assert picker.options[1:] == [f"sql（{base} 的 LoRA 适配器）"]
    picker.set_value("sql").run()
    assert at.selectbox(key="model").value == "sql"
