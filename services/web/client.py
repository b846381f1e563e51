"""HTTP client for the TeleChat API (OpenAI routes), with typed, human-sized errors.

Every failure surfaces as an `APIError` subclass whose `key` names a message in `i18n.py`; the
page shows that sentence, never a traceback. `str(error)` is a short English fallback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import httpx

from services.web.sse import SSEParser

# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """Base of every error the client raises. `detail` is the server's own message, if any."""

    key: ClassVar[str] = "error_api"

    def __init__(self, message: str, *, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class APIUnavailable(APIError):
    """Nothing answers at API_URL (refused, unknown host, bad URL)."""

    key = "error_unavailable"


class APITimeout(APIError):
    """The API accepted the connection but went silent for longer than the read timeout."""

    key = "error_timeout"


class APIOverloaded(APIError):
    """429: the API's queue is full; `retry_after` seconds from the header when given."""

    key = "error_overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class APIUnauthorized(APIError):
    """401/403: API_KEY is missing or does not match the API's."""

    key = "error_unauthorized"


class APIRequestError(APIError):
    """Another 4xx: the API rejected the request (e.g. prompt too long, bad parameter)."""

    key = "error_request"


class APINotReady(APIError):
    """503: the API is up but cannot serve yet (usually still loading the model)."""

    key = "error_not_ready"


class APIServerError(APIError):
    """5xx, or an error reported inside the stream."""

    key = "error_server"


class APIProtocolError(APIError):
    """The reply was not what the OpenAI protocol promises (bad JSON, stream cut short)."""

    key = "error_protocol"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header; the HTTP-date form is rare enough to ignore."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from_response(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> APIError:
    """Map an HTTP error status + `{"error": {"message", ...}}` body to a typed error."""
    detail = None
    try:
        payload = json.loads(body)
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict):
            detail = str(err.get("message") or "") or None
        elif isinstance(payload, dict) and isinstance(payload.get("detail"), str):
            detail = payload["detail"]  # FastAPI's default error shape
    except ValueError:
        pass
    kw: dict[str, Any] = {"status": status, "detail": detail}
    if status == 429:
        retry = _retry_after(httpx.Headers(headers).get("retry-after"))
        return APIOverloaded("The API is busy (429).", retry_after=retry, **kw)
    if status in (401, 403):
        return APIUnauthorized(f"The API refused the API key ({status}).", **kw)
    if status == 503:
        return APINotReady("The API is not ready yet (503).", **kw)
    if 400 <= status < 500:
        return APIRequestError(f"The API rejected the request ({status}).", **kw)
    return APIServerError(f"The API failed ({status}).", **kw)


def _error_from_transport(exc: httpx.HTTPError) -> APIError:
    """Map an httpx transport failure to a typed error."""
    if isinstance(exc, httpx.ConnectTimeout):
        return APIUnavailable("The API did not accept a connection in time.")
    if isinstance(exc, httpx.TimeoutException):
        return APITimeout("The API took too long to answer.")
    if isinstance(exc, httpx.RemoteProtocolError):
        return APIProtocolError("The connection to the API broke off.")
    return APIUnavailable("Cannot connect to the API.")


def error_record(err: APIError) -> dict[str, Any]:
    """A stored form of an error (replies keep the error that cut them; another process shows it)."""
    record: dict[str, Any] = {"key": err.key, "message": str(err), "status": err.status, "detail": err.detail}
    if isinstance(err, APIOverloaded):
        record["retry_after"] = err.retry_after
    return record


def error_from_record(record: dict[str, Any]) -> APIError:
    """The typed error back from `error_record` (an unknown key gives the generic APIError)."""
    kinds = {cls.key: cls for cls in (APIError, *_subclasses(APIError))}
    cls = kinds.get(str(record.get("key")), APIError)
    kw: dict[str, Any] = {"status": record.get("status"), "detail": record.get("detail")}
    if cls is APIOverloaded:
        kw["retry_after"] = record.get("retry_after")
    return cls(str(record.get("message") or "The API failed."), **kw)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


# ---------------------------------------------------------------------------- data


class Health(Enum):
    """What the page's status indicator shows."""

    READY = "ready"  # /ready 200: the model is loaded
    LOADING = "loading"  # /health 200 but /ready not yet
    DOWN = "down"  # nothing usable answers


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults the API serves for a model (its generation_config)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    do_sample: bool = True

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> GenerationDefaults:
        """Read the served dict; missing or null fields keep this class's defaults."""
        raw = raw or {}

        def pick(name: str, cast: type) -> Any:
            value = raw.get(name)
            return cast(value) if value is not None else getattr(cls, name)

        return cls(
            temperature=pick("temperature", float),
            top_p=pick("top_p", float),
            top_k=pick("top_k", int),
            repetition_penalty=pick("repetition_penalty", float),
            max_tokens=pick("max_tokens", int),
            do_sample=pick("do_sample", bool),
        )


DEMO_MODEL_ID = "telechat-demo"
"""The id every backend gives the built-in demo model (``telechat.model.checkpoint.DEMO_MODEL_NAME``; the UI
imports nothing of the runtime). Servers without our ``telechat_demo`` field (vLLM) are read by it."""


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `GET /v1/models`."""

    id: str
    max_model_len: int | None = None
    demo: bool = False
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    parent: str | None = None
    """For a LoRA adapter served on a base model (vLLM's field): the base model's id."""


@dataclass(frozen=True)
class ChatParams:
    """Sampling knobs from the sidebar. Greedy (do_sample off) is sent as temperature 0."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    repetition_penalty: float
    do_sample: bool = True

    def to_request(self) -> dict[str, Any]:
        """Request fields: OpenAI ones, then the TeleChat extensions (top_k, repetition_penalty)."""
        return {
            "temperature": self.temperature if self.do_sample else 0.0,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


# ---------------------------------------------------------------------------- streaming


class ChatStream:
    """Text deltas of one streamed completion.

    Iterate it for text; `finish_reason` and `usage` are set as the server reports them.
    `close()` drops the HTTP connection, which makes the API abort the generation.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False

    def __iter__(self) -> Iterator[str]:
        parser = SSEParser()
        try:
            for chunk in self._response.iter_bytes():
                for event in parser.feed(chunk):
                    yield from self._on_data(event.data)
            for event in parser.close():
                yield from self._on_data(event.data)
        except httpx.HTTPError as exc:
            raise _error_from_transport(exc) from exc
        if not self.done and self.finish_reason is None:
            raise APIProtocolError("The reply stream ended early.")

    def _on_data(self, data: str) -> Iterator[str]:
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise APIProtocolError("The API sent an unreadable stream event.") from exc
        if not isinstance(chunk, dict):
            raise APIProtocolError("The API sent an unexpected stream event.")
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise APIServerError("The API failed while replying.", detail=err.get("message"))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._response.close()


# ---------------------------------------------------------------------------- client


class APIClient:
    """Synchronous client; one per page process (httpx.Client is safe to share across threads)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )
        # Status probes must stay snappy even when the read timeout is generous.
        self._probe_timeout = httpx.Timeout(min(read_timeout, 2.0), connect=min(connect_timeout, 2.0))

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, *, probe: bool = False) -> httpx.Response:
        try:
            return self._http.get(path, timeout=self._probe_timeout if probe else httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise _error_from_transport(exc) from exc
        except httpx.InvalidURL as exc:
            raise APIUnavailable("API_URL is not a valid URL.") from exc

    def health(self) -> Health:
        """READY, LOADING (alive, model not loaded yet) or DOWN; never raises.

        A server without ``/ready`` (404: the vLLM OpenAI server, which listens only once its model
        is loaded) is READY as soon as ``/health`` answers 200.
        """
        try:
            ready = self._get("/ready", probe=True).status_code
            if ready == 200:
                return Health.READY
            if self._get("/health", probe=True).status_code != 200:
                return Health.DOWN
            return Health.READY if ready == 404 else Health.LOADING
        except APIError:
            return Health.DOWN

    def models(self) -> list[ModelInfo]:
        """The served models with their generation defaults."""
        resp = self._get("/v1/models", probe=True)
        if resp.status_code != 200:
            raise error_from_response(resp.status_code, resp.headers, resp.content)
        try:
            entries = resp.json()["data"]
            return [
                ModelInfo(
                    id=str(m["id"]),
                    max_model_len=m.get("max_model_len"),
                    demo=bool(m.get("telechat_demo", m["id"] == DEMO_MODEL_ID)),
                    defaults=GenerationDefaults.from_json(m.get("generation_defaults")),
                    parent=str(m["parent"]) if m.get("parent") else None,
                )
                for m in entries
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise APIProtocolError("The API sent an unreadable model list.") from exc

    @contextmanager
    def stream_chat(
        self, model: str, messages: list[dict[str, str]], params: ChatParams
    ) -> Iterator[ChatStream]:
        """Open a streamed chat completion; leaving the block closes the connection.

        Closing early (Stop, page rerun, error) is how the API learns to abort: keep the
        `with` block around the whole consumption, including UI updates that may raise.
        """
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params.to_request(),
        }
        try:
            request = self._http.build_request("POST", "/v1/chat/completions", json=body)
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _error_from_transport(exc) from exc
        except httpx.InvalidURL as exc:
            raise APIUnavailable("API_URL is not a valid URL.") from exc
        stream = ChatStream(response)
        try:
            if response.status_code != 200:
                try:
                    body_bytes = response.read()
                except httpx.HTTPError:
                    body_bytes = b""
                raise error_from_response(response.status_code, response.headers, body_bytes)
            yield stream
        finally:
            stream.close()
