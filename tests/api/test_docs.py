"""/docs and /redoc work offline: every asset URL is this server's and answers with its content type."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.api.settings import Settings

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client():
    # No lifespan (no `with`): the model never loads; the docs pages do not need it.
    return TestClient(create_app(Settings(api_key="secret")))


def _urls(html: str) -> list[str]:
    """Every URL a page loads: src/href attributes and the OpenAPI url handed to the UI."""
    return re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html) + \
        re.findall(r"spec-url=\"([^\"]+)\"", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client, page):
    """The page references no CDN (no http(s):// or //host URL); each asset answers 200 with the right
    content type, without an API key even when the server has one."""
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _urls(r.text)
    assert "/openapi.json" in urls and any(u.endswith(".js") for u in urls), urls
    assert not re.search(r"(?:https?:)?//[\w-]+\.", r.text), r.text  # no CDN, no web font, no validator
    assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rfind("."):]
        if suffix in CONTENT_TYPES:
            assert asset.headers["content-type"].startswith(CONTENT_TYPES[suffix]), (url, asset.headers)
            assert len(asset.content) > 1000


def test_swagger_oauth2_redirect_page(client):
    r = client.get("/docs/oauth2-redirect")
    assert r.status_code == 200 and "oauth2" in r.text.lower()


def test_unknown_docs_asset_is_404(client):
    assert client.get("/docs/assets/../../etc/passwd").status_code == 404
    assert client.get("/docs/assets/nothing.js").status_code == 404
