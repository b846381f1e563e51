"""The API's /docs (Swagger UI) and /redoc render in headless Chromium with every request off the
loopback interface refused: the pages need nothing from the internet."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def api(browser, web_api):
    """The web tests' API (its key guards the model routes only, not the docs)."""
    return web_api


def _offline_page(browser):
    """A page whose requests to any host but 127.0.0.1 are aborted and recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1" or r.request.url.startswith(("data:", "blob:")):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return context, page, outside


def test_swagger_ui_renders_the_operations_offline(browser, api):
    context, page, outside = _offline_page(browser)
    try:
        page.goto(api.url + "/docs")
        page.locator(".opblock").first.wait_for()
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/v1/chat/completions", "/v1/models", "/health"} <= {p.replace("\u200b", "") for p in paths}
        assert page.locator(".info .title").inner_text().startswith("TeleChat Stack API")
        assert outside == []
    finally:
        context.close()


def test_redoc_renders_the_operations_offline(browser, api):
    context, page, outside = _offline_page(browser)
    try:
        page.goto(api.url + "/redoc")
        page.get_by_text("/v1/chat/completions").first.wait_for(state="attached")
        assert page.locator("h1").first.inner_text().startswith("TeleChat Stack API")
        assert outside == []
    finally:
        context.close()
