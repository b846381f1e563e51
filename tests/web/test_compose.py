"""compose.yaml's web side, checked without a Docker engine: the chats live in a named volume (they survive
`docker compose down` / `up`), and the postgres profile is the official image wired to the web UI."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import REPO, resolved_compose

DATA_DIR = "/var/lib/telechat-web"


@pytest.fixture(scope="module")
def services() -> dict:
    """compose.yaml as Compose resolves it with .env, every profile on."""
    model = resolved_compose()
    assert {"telechat-web", "telechat-postgres"} <= set(model["volumes"])
    return model["services"]


@pytest.mark.parametrize("name", ["web", "web-vllm"])
def test_the_chats_live_in_a_named_volume(services, name):
    web = services[name]
    assert web["environment"]["WEB_DATA_DIR"] == DATA_DIR
    [volume] = [v for v in web["volumes"] if v["target"] == DATA_DIR]
    assert volume["type"] == "volume" and volume["source"] == "telechat-web", "a named volume, not the container"
    assert web["environment"]["DATABASE_URL"] == "" and web["environment"]["WEB_AUTH"] == ""  # .env defaults
    assert web["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}


def test_the_image_gives_the_volume_to_the_page_user():
    """An empty named volume takes the owner of its mount point in the image: the non-root page user."""
    dockerfile = re.sub(r"\\\n\s*", " ", (REPO / "docker/web.Dockerfile").read_text(encoding="utf-8"))
    assert f"mkdir -p {DATA_DIR}" in dockerfile and f"chown 1000:1000 {DATA_DIR}" in dockerfile
    assert f"WEB_DATA_DIR={DATA_DIR}" in dockerfile
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)


def test_postgres_profile_is_the_official_image_kept_in_its_volume(services):
    pg = services["postgres"]
    assert pg["profiles"] == ["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+(-\w+)?", pg["image"]), "the official image, pinned"
    assert (pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_DB"]) == ("telechat", "telechat")
    assert "POSTGRES_PASSWORD" in pg["environment"]
    [volume] = pg["volumes"]
    assert (volume["source"], volume["target"]) == ("telechat-postgres", "/var/lib/postgresql/data")
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in pg, "reachable from the compose network only"
    assert "profiles" not in services["web"], "a plain `docker compose up` keeps SQLite"
