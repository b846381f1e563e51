"""HTTP probes of the container lane (tests/containers/run.sh); stdlib only, so the same file runs on the
host and, piped to `python -`, inside the web image.

    probe.py ready BASE                       GET BASE/ready answers 200
    probe.py chat BASE [--stream] [--model ID]  a chat completion (streamed: SSE chunks up to [DONE])
"""

from __future__ import annotations

import argparse
import json
import urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # compose names and loopback: no proxy


def get_json(url: str) -> dict:
    with OPENER.open(url, timeout=30) as resp:
        return json.load(resp)


def chat(base: str, stream: bool, expect_model: str | None) -> None:
    model = get_json(base + "/v1/models")["data"][0]["id"]
    if expect_model and model != expect_model:
        raise SystemExit(f"serving {model!r}, expected {expect_model!r}")
    body = {"model": model, "messages": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
            "max_tokens": 16, "ignore_eos": True, "stream": stream}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    pieces, done = [], False
    with OPENER.open(req, timeout=300) as resp:
        if not stream:
            pieces.append(json.load(resp)["choices"][0]["message"]["content"])
            done = True
        else:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:]).get("choices", []):
                        pieces.append(choice.get("delta", {}).get("content") or "")
    text = "".join(pieces)
    print(f"{model}: {len([p for p in pieces if p])} chunks, reply {text!r}")
    if not done or not text:
        raise SystemExit("no complete reply" + ("" if done else " (stream ended before [DONE])"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["ready", "chat"])
    parser.add_argument("base")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model")
    args = parser.parse_args()
    base = args.base.rstrip("/")
    if args.what == "ready":
        with OPENER.open(base + "/ready", timeout=30) as resp:  # any status but 200 raises
            print(resp.status, resp.read(300).decode(errors="replace"))
    else:
        chat(base, args.stream, args.model)


if __name__ == "__main__":
    main()
