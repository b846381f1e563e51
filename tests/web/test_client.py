"""API client errors: every failure becomes a typed error with a short sentence, never a raw one."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from services.web.client import (
    APIClient,
    APIError,
    APINotReady,
    APIOverloaded,
    APIProtocolError,
    APIRequestError,
    APIServerError,
    APITimeout,
    APIUnauthorized,
    APIUnavailable,
    DEMO_MODEL_ID,
    ChatParams,
    GenerationDefaults,
    Health,
    error_from_record,
    error_from_response,
    error_record,
)
from services.web.i18n import error_text

PARAMS = ChatParams(temperature=0.7, top_p=0.9, top_k=5, max_tokens=16, repetition_penalty=1.0)


def _body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "x", "code": 1}}).encode()


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, APIRequestError), (404, APIRequestError), (422, APIRequestError), (401, APIUnauthorized),
     (403, APIUnauthorized), (429, APIOverloaded), (500, APIServerError), (502, APIServerError),
     (503, APINotReady)],
)
def test_status_maps_to_typed_error(status: int, cls: type[APIError]) -> None:
    err = error_from_response(status, {}, _body("prompt is too long"))
    assert type(err) is cls
    assert err.status == status and err.detail == "prompt is too long"
    for lang in ("zh", "en"):
        text = error_text(err, lang, api_url="http://api:8070")
        assert text and "{" not in text and "Traceback" not in text


def test_retry_after_is_read_and_shown() -> None:
    err = error_from_response(429, {"Retry-After": "7"}, b"")
    assert isinstance(err, APIOverloaded) and err.retry_after == 7.0
    assert "7" in error_text(err, "zh", api_url="") and "7 s" in error_text(err, "en", api_url="")
    assert error_from_response(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"").retry_after is None


def test_non_json_error_body_still_maps() -> None:
    err = error_from_response(500, {}, b"<html>Internal Server Error</html>")
    assert isinstance(err, APIServerError) and err.detail is None
    assert "未知原因" in error_text(err, "zh", api_url="")


def test_fastapi_detail_shape_is_read() -> None:
    assert error_from_response(404, {}, b'{"detail": "Not Found"}').detail == "Not Found"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_unavailable() -> None:
    client = APIClient(f"http://127.0.0.1:{_closed_port()}")
    assert client.health() is Health.DOWN
    with pytest.raises(APIUnavailable):
        client.models()
    with pytest.raises(APIUnavailable), client.stream_chat("m", [{"role": "user", "content": "你好"}], PARAMS):
        pass


@pytest.mark.parametrize("url", ["localhost:8070", "http://", "ftp://example.invalid/"])
def test_malformed_api_url_is_unavailable(url: str) -> None:
    client = APIClient(url)
    assert client.health() is Health.DOWN
    with pytest.raises(APIUnavailable):
        client.models()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP socket that accepts connections and never answers (a hung API)."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in conns:
        c.close()
    server.close()


def test_silent_api_times_out(silent_server: str) -> None:
    client = APIClient(silent_server, read_timeout=0.3)
    with pytest.raises(APITimeout), client.stream_chat("m", [{"role": "user", "content": "hi"}], PARAMS):
        pass
    assert client.health() is Health.DOWN


def test_api_key_is_sent_as_bearer_and_not_in_repr() -> None:
    client = APIClient("http://127.0.0.1:1", "tok-123")
    assert client._http.headers["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(client)


def test_generation_defaults_from_served_json() -> None:
    d = GenerationDefaults.from_json({"temperature": 0.3, "top_p": 0.85, "top_k": 5, "repetition_penalty": 1.03,
                                      "max_tokens": 1024, "do_sample": False})
    assert d == GenerationDefaults(0.3, 0.85, 5, 1.03, 1024, False)
    assert GenerationDefaults.from_json({"temperature": None}) == GenerationDefaults()


def test_greedy_is_sent_as_temperature_zero() -> None:
    greedy = ChatParams(0.3, 0.85, 5, 64, 1.03, do_sample=False).to_request()
    assert greedy == {"temperature": 0.0, "top_p": 0.85, "max_tokens": 64, "top_k": 5, "repetition_penalty": 1.03}
    assert PARAMS.to_request()["temperature"] == 0.7


def test_protocol_error_message_is_human() -> None:
    assert error_text(APIProtocolError("x"), "en", api_url="").startswith("The API's reply")


def _status_server(statuses: dict[str, int]):
    """A loopback HTTP server answering GET ``path`` with ``statuses[path]`` (404 for any other path)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(statuses.get(self.path, 404))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("statuses, expected", [
    ({"/ready": 200, "/health": 200}, Health.READY),
    ({"/ready": 503, "/health": 200}, Health.LOADING),
    ({"/health": 200}, Health.READY),  # no /ready route: the vLLM OpenAI server, up once its model is loaded
    ({"/health": 500}, Health.DOWN),
    ({}, Health.DOWN),
])
def test_health_with_and_without_a_ready_route(statuses: dict[str, int], expected: Health) -> None:
    server = _status_server(statuses)
    try:
        assert APIClient(f"http://127.0.0.1:{server.server_address[1]}").health() is expected
    finally:
        server.shutdown()
        server.server_close()


def test_demo_model_id_is_the_runtime_name() -> None:
    """The UI's copy of the demo id (it imports nothing of the runtime) is the name every backend serves."""
    from telechat.model.checkpoint import DEMO_MODEL_NAME

    assert DEMO_MODEL_ID == DEMO_MODEL_NAME


@pytest.mark.parametrize("err", [APIUnavailable("down"), APIOverloaded("busy", retry_after=7.0, status=429),
                                 APIRequestError("bad", status=400, detail="prompt is too long"), APIError("x")])
def test_error_record_round_trip(err: APIError) -> None:
    """A reply keeps the error that cut it as JSON; the page (any process) shows the same sentence from it."""
    back = error_from_record(json.loads(json.dumps(error_record(err))))
    assert type(back) is type(err) and (back.status, back.detail) == (err.status, err.detail)
    for lang in ("zh", "en"):
        assert error_text(back, lang, api_url="http://a") == error_text(err, lang, api_url="http://a")
    assert type(error_from_record({"key": "no_such_key"})) is APIError
