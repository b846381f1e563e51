"""LoRA adapters chosen per request (``--lora-modules``, ``/v1/load_lora_adapter``) over a real server.

The expected replies come from PEFT merging each adapter into the demo model in this process
(:func:`telechat.runtime.merge_adapter`) and generating greedily with the engine, decoded as the server
decodes; the server must give them whether a request runs alone or batched with the base model and the
other adapter.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
import torch

from telechat.chat_format import ChatFormat
from telechat.engine.core import EngineConfig, LLMEngine
from telechat.engine.sampling import SamplingParams
from telechat.engine.text import TextStream
from telechat.model.loader import load_model
from telechat.runtime import merge_adapter
from telechat.tokenizer import load_tokenizer

KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = [{"role": "user", "content": "你好"}]
MAX_TOKENS = 24


def make_adapter(base_dir, out, seed: int, targets: list[str], r: int = 4):
    """A PEFT adapter of the demo model with random non-zero B matrices (it changes the reply)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base_dir, device="cpu"),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-adapters")
    return {
        # the fine-tune job's targets (jobs/finetune), and a second adapter on part of them
        "alpha": make_adapter(demo_model_dir, root / "alpha", 0,
                              ["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"]),
        "beta": make_adapter(demo_model_dir, root / "beta", 1, ["query", "key_value", "up_proj"], r=8),
    }


@pytest.fixture(scope="module")
def expected(demo_model_dir, adapters) -> dict[str | None, str]:
    """Chat reply to :data:`QUESTION` of the base model (None) and of each adapter merged into it."""
    tok = load_tokenizer(demo_model_dir)
    chat = ChatFormat(tok, None)
    prompt = chat.encode_prompt(QUESTION)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=chat.stop_token_ids)
    out = {}
    for name in (None, *adapters):
        model = load_model(demo_model_dir, device="cpu")
        if name is not None:
            model = merge_adapter(model, adapters[name])
        tokens = LLMEngine(model, EngineConfig(max_num_seqs=2)).generate([prompt], params)[0]
        out[name] = TextStream(tok, skip_token_ids=chat.stop_token_ids).feed(tokens, finished=True)
    assert len(set(out.values())) == 3, "each adapter should change the reply"
    return out


@pytest.fixture(scope="module")
def lora_server(demo_model_dir, adapters, api_server):
    return api_server(demo_model_dir, "--lora-modules", ",".join(f"{n}={p}" for n, p in adapters.items()),
                      "--max-loras", "2", "--max-lora-rank", "8", "--api-key", KEY)


def _chat(url: str, model: str | None) -> httpx.Response:
    body = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "repetition_penalty": 1.0}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def _base_id(url: str) -> str:
    return httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]


def test_models_lists_each_adapter_with_its_parent(lora_server, adapters):
    cards = httpx.get(lora_server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    base = cards[0]
    assert base["parent"] is None and [c["id"] for c in cards] == [base["id"], "alpha", "beta"]
    for card in cards[1:]:
        assert card["parent"] == base["id"] and card["root"] == str(adapters[card["id"]])
        assert card["object"] == "model" and card["max_model_len"] == base["max_model_len"]


def test_each_adapter_alone_answers_as_its_merged_model(lora_server, expected):
    base = _base_id(lora_server.url)
    for name in ("alpha", "beta", None):
        reply = _chat(lora_server.url, name).json()
        assert reply["choices"][0]["message"]["content"] == expected[name], name
        assert reply["model"] == (name or base)


def test_two_adapters_and_the_base_in_one_batch(lora_server, expected):
    """Sent at once (one engine batch), every request still gets its own model's reply; twice over, so
    slots and the prefix cache are reused."""
    body = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "repetition_penalty": 1.0}
    names = ["alpha", None, "beta", "alpha", "beta", None]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=lora_server.url, headers=AUTH, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions",
                                                         json=body | ({"model": n} if n else {}))
                                             for n in names))
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    assert asyncio.run(run()) == [expected[n] for n in names]


def test_completions_route_takes_an_adapter(lora_server, demo_model_dir, adapters):
    """/v1/completions with an adapter continues a raw prompt as the merged model does."""
    tok = load_tokenizer(demo_model_dir)
    ids = tok("你好", add_special_tokens=False)["input_ids"]
    merged = merge_adapter(load_model(demo_model_dir, device="cpu"), adapters["beta"])
    tokens = LLMEngine(merged, EngineConfig(max_num_seqs=2)).generate([ids], SamplingParams(max_tokens=8,
                                                                                          temperature=0))[0]
    want = TextStream(tok, prompt_ids=ids).feed(tokens, finished=True)
    body = {"model": "beta", "prompt": ids, "max_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}
    reply = httpx.post(lora_server.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert "choices" in reply, reply
    assert reply["choices"][0]["text"] == want and reply["model"] == "beta"


def test_unknown_model_is_404(lora_server):
    r = _chat(lora_server.url, "gamma")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "'alpha'" in err["message"] and "'beta'" in err["message"]


def test_load_and_unload_at_run_time(lora_server, adapters, expected, tmp_path):
    url = lora_server.url
    copy = shutil.copytree(adapters["alpha"], tmp_path / "alpha-copy")
    body = {"lora_name": "alpha2", "lora_path": str(copy)}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=30).status_code == 401
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "alpha2" and r.json()["root"] == str(copy)
    ids = [c["id"] for c in httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"]]
    assert ids[1:] == ["alpha", "beta", "alpha2"]
    # three adapters, two slots: alpha2 takes a slot from an idle one
    assert _chat(url, "alpha2").json()["choices"][0]["message"]["content"] == expected["alpha"]
    assert _chat(url, "beta").json()["choices"][0]["message"]["content"] == expected["beta"]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha2"}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json() == {"id": "alpha2", "object": "model", "deleted": True}
    assert _chat(url, "alpha2").status_code == 404
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "alpha2"}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert _chat(url, "alpha").json()["choices"][0]["message"]["content"] == expected["alpha"]


@pytest.fixture(scope="module")
def bad_folders(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-adapters")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not an adapter")
    make_adapter(demo_model_dir, root / "rank16", 2, ["query"], r=16)
    odd = make_adapter(demo_model_dir, root / "odd", 3, ["query"])
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query", "lm_head"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("body, needle", [
    ({"lora_name": "x"}, "lora_path"),
    ({"lora_name": "", "lora_path": "/tmp"}, "lora_name"),
    ({"lora_name": "two words", "lora_path": "/tmp"}, "lora_name"),
    ({"lora_name": 5, "lora_path": "/tmp"}, "lora_name"),
    ({"lora_name": "alpha", "lora_path": "{root}/plain"}, "'alpha' is already in use"),
    ({"lora_name": "{base}", "lora_path": "{root}/plain"}, "is already in use"),
    ({"lora_name": "x", "lora_path": "{root}/missing"}, "does not exist"),
    ({"lora_name": "x", "lora_path": "{root}/plain"}, "has no adapter_config.json"),
    ({"lora_name": "x", "lora_path": "{root}/rank16"}, "rank 16, above this server's max_lora_rank 8"),
    ({"lora_name": "x", "lora_path": "{root}/odd"}, "targets modules this model lacks: lm_head"),
])
def test_bad_loads_are_400(lora_server, bad_folders, body, needle):
    base = _base_id(lora_server.url)
    body = {k: v.format(root=bad_folders, base=base) if isinstance(v, str) else v for k, v in body.items()}
    r = httpx.post(lora_server.url + "/v1/load_lora_adapter", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert "x" not in [c["id"] for c in httpx.get(lora_server.url + "/v1/models", headers=AUTH).json()["data"]]


def test_server_without_lora_refuses_loads(demo_server, adapters):
    r = httpx.post(demo_server.url + "/v1/load_lora_adapter",
                   json={"lora_name": "alpha", "lora_path": str(adapters["alpha"])}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "lora_disabled"
    assert [c["parent"] for c in httpx.get(demo_server.url + "/v1/models").json()["data"]] == [None]


def test_lora_settings_from_flags_and_environment(monkeypatch):
    """--lora-modules / LORA_MODULES take name=folder entries (comma- or space-separated); adapters given
    turn per-request LoRA on; a malformed entry or a repeated name is a one-line settings error."""
    from services.api.main import parse_settings
    from services.settings_cli import SettingsError

    for name in ("LORA_MODULES", "ENABLE_LORA", "MAX_LORAS", "MAX_LORA_RANK"):
        monkeypatch.delenv(name, raising=False)
    s = parse_settings(["--lora-modules", "a=/x,b=/y", "--max-loras", "2"])
    assert (s.lora_module_map, s.lora_enabled, s.max_loras) == ({"a": "/x", "b": "/y"}, True, 2)
    assert not parse_settings([]).lora_enabled and parse_settings(["--enable-lora"]).lora_enabled
    monkeypatch.setenv("LORA_MODULES", "c=/z,d=/w")
    assert parse_settings([]).lora_module_map == {"c": "/z", "d": "/w"}
    for bad, why in (("a=/x,a=/y", "given twice"), ("a", "not name=folder"), ("=/x", "not name=folder")):
        monkeypatch.setenv("LORA_MODULES", bad)
        with pytest.raises(SettingsError, match=f"--lora-modules, env LORA_MODULES.*{why}"):
            parse_settings([])
