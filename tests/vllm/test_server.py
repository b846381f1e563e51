"""The vLLM OpenAI server with the plugin, started by ``python -m telechat.vllm_plugin.serve``, as the web UI sees it."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import free_port, start_service
from tests.vllm.conftest import Native

MESSAGES = [{"role": "user", "content": "你好"}]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    """The demo model served by vLLM on a loopback port (float32, eager); stopped at the end of the module."""
    port = free_port()
    home = tmp_path_factory.mktemp("telechat-home")
    cmd = [sys.executable, "-m", "telechat.vllm_plugin.serve", "--model", str(demo_model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--", "--enforce-eager", "--max-num-seqs", "4"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TELECHAT_HOME": str(home), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    service = start_service(cmd, port, "/health", home / "vllm.log", env, timeout=300, what="vLLM server")
    yield service
    service.stop()


def test_web_client_sees_a_ready_server_and_its_demo_model(server):
    """No /ready route on vLLM: the web client still reports READY; the demo model has our API's id
    (a drop-in for clients) and the UI labels it a demo."""
    from services.web.client import APIClient, Health
    from telechat.model.checkpoint import DEMO_MODEL_NAME

    client = APIClient(server.url)
    assert client.health() is Health.READY
    [model] = client.models()
    assert model.id == DEMO_MODEL_NAME and model.demo
    assert model.max_model_len and model.max_model_len > 0


def test_streamed_chinese_chat_uses_our_chat_format_and_matches_native_greedy(server, demo_model_dir):
    """A streamed chat completion in Chinese through the web client: no U+FFFD, the prompt is our
    ``<_user>…<_bot>`` format (same token count), and the greedy reply equals our native model's."""
    from services.web.client import APIClient, ChatParams
    from telechat.chat_format import ChatFormat
    from telechat.model.checkpoint import DEMO_MODEL_NAME

    client = APIClient(server.url, read_timeout=120)
    params = ChatParams(temperature=0.7, top_p=1.0, top_k=0, max_tokens=MAX_TOKENS, repetition_penalty=1.0,
                        do_sample=False)
    with client.stream_chat(DEMO_MODEL_NAME, MESSAGES, params) as stream:
        chunks = list(stream)
    text = "".join(chunks)
    assert len(chunks) > 1 and text.strip()
    assert "\ufffd" not in text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)

    native = Native(demo_model_dir)
    generation = json.loads((demo_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    chat = ChatFormat(native.tokenizer, generation)
    prompt = chat.encode_prompt(MESSAGES)
    assert stream.usage["prompt_tokens"] == len(prompt)
    tokens = native.greedy(prompt, stream.usage["completion_tokens"])
    reply = tokens[: tokens.index(chat.end_id)] if chat.end_id in tokens else tokens
    assert stream.finish_reason == ("stop" if chat.end_id in tokens else "length")
    assert text == native.tokenizer.decode(reply, skip_special_tokens=True)
