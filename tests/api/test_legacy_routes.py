"""Legacy TeleChat routes (docs/legacy-api.md): framing byte for byte, the official schema, ranges and codes."""

from __future__ import annotations

import httpx
import pytest

DIALOG = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！"},
          {"role": "user", "content": "介绍一下你自己"}]
GREEDY = {"dialog": DIALOG, "do_sample": False}


def test_v2_streams_exactly_the_v4_reply(demo_server):
    """/v2 body = the raw UTF-8 bytes of /v4's ``content``: no SSE, no JSON, no end marker."""
    v4 = httpx.post(demo_server.url + "/telechat/gptDialog/v4", json=GREEDY, timeout=60)
    assert v4.status_code == 200
    body = v4.json()
    assert set(body) == {"role", "content"} and body["role"] == "bot" and isinstance(body["content"], str)
    chunks = []
    with httpx.stream("POST", demo_server.url + "/telechat/gptDialog/v2", json=GREEDY, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; charset=utf-8"
        for chunk in r.iter_raw():
            chunk.decode("utf-8")  # strict: no chunk ends inside a character
            chunks.append(chunk)
    assert b"".join(chunks) == body["content"].encode("utf-8") and body["content"]


def test_v2_utf8_chunks_with_byte_fallback_emoji(loop_server):
    """Through the real 12B tokenizer (emoji as 4 byte pieces) no /v2 chunk splits a character."""
    with httpx.stream("POST", loop_server.url + "/telechat/gptDialog/v2", timeout=60,
                      json={"dialog": [{"role": "user", "content": "说"}], "do_sample": False, "max_length": 100}) as r:
        raw = [c for c in r.iter_raw()]
    text = "".join(c.decode("utf-8") for c in raw)
    assert "🌞" in text and "\ufffd" not in text


def test_official_example_request(demo_server):
    """The request of the official test_json.py/test_stream.py (sampling on, floats strictly typed)."""
    body = {"dialog": DIALOG, "do_sample": True, "top_p": 0.1, "temperature": 0.1, "repetition_penalty": 1.03,
            "max_length": 64, "top_k": 20}
    r = httpx.post(demo_server.url + "/telechat/gptDialog/v4", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["role"] == "bot"


@pytest.mark.parametrize("body, code", [
    ({}, 10301),
    ({"dialog": []}, 10301),
    ({"dialog": [{"role": "bot", "content": "hi"}]}, 10904),
    ({"dialog": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]}, 10904),
    ({"dialog": DIALOG[:2]}, 10904),
    ({"dialog": "你好"}, 10904),
    ({"dialog": [{"role": "user"}]}, 10904),
    ({"dialog": DIALOG, "do_sample": "yes"}, 10305),
    ({"dialog": DIALOG, "max_length": 0}, 10305),
    ({"dialog": DIALOG, "max_length": 4097}, 10305),
    ({"dialog": DIALOG, "max_length": 64.0}, 10305),
    ({"dialog": DIALOG, "top_k": 100}, 10305),
    ({"dialog": DIALOG, "top_p": 1}, 10305),
    ({"dialog": DIALOG, "top_p": 1.0}, 10305),
    ({"dialog": DIALOG, "temperature": 0}, 10305),
    ({"dialog": DIALOG, "repetition_penalty": 1}, 10305),
    ({"dialog": DIALOG, "repetition_penalty": 1.0}, 10305),
    ({"dialog": DIALOG, "max_length": 2}, 10305),
])
@pytest.mark.parametrize("route", ["v2", "v4"])
def test_invalid_requests_get_official_codes(demo_server, route, body, code):
    """Each bad request: HTTP 400 and the official body with the official code and message."""
    r = httpx.post(f"{demo_server.url}/telechat/gptDialog/{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == code and err["flag"] == "0" and err["data"] == "执行失败" and err["seqid"] == ""
    assert err["message"] in ("服务必填参数缺失", "服务请求参数dialog错误", "请求参数范围错误") and err["detail"]


def test_invalid_json_is_missing_parameters(demo_server):
    r = httpx.post(demo_server.url + "/telechat/gptDialog/v4", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == 10301 and "JSON" in r.json()["detail"]
