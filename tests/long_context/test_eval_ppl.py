"""``telechat eval-ppl``: chunked == unchunked, data formats, table/JSON outputs and clear errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from telechat import cli
from telechat.model.loader import load_model
from telechat.errors import UserError
from telechat.tools.eval_ppl import (
    evaluate,
    load_token_ids,
    main,
    markdown_table,
    parse_lengths,
    rope_mode,
)
from telechat.tools.perplexity import perplexity, window_nll
from telechat.tokenizer import load_tokenizer
from tests.long_context.conftest import TINY_TRAINING_SEQLEN

MODES = ("none", "ntk", "ntk+scaling")
TEXT = "长上下文评测：困惑度随长度变化。The quick brown fox jumps over the lazy dog.\n" * 60


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return torch.randint(7, 700, (1200,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", (7, 32, 100))
def test_chunked_window_equals_single_pass(tiny_model, stream, mode, chunk):
    """KV-cached chunks with RoPE pinned to the window length give the single-pass NLL (float32 rounding)."""
    window = stream[:300]  # ~10x the training length: every mode has its own alpha/mscale here
    with rope_mode(tiny_model, mode):
        whole, n = window_nll(tiny_model, window)
        chunked, m = window_nll(tiny_model, window, prefill_chunk=chunk, logits_chunk=13)
    assert n == m == 299
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_evaluate_chunked_equals_unchunked_and_modes_split_past_training(tiny_model, stream):
    """The whole grid agrees chunked vs unchunked; modes coincide up to training_seqlen and part after."""
    lengths = [16, TINY_TRAINING_SEQLEN, 128, 256]
    single = evaluate(tiny_model, stream, lengths, MODES, windows=2, prefill_chunk=None, progress=False)
    chunked = evaluate(tiny_model, stream, lengths, MODES, windows=2, prefill_chunk=24, progress=False)
    for a, b in zip(single, chunked):
        assert (a.mode, a.length, a.tokens, a.windows) == (b.mode, b.length, b.tokens, b.windows)
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    ppl = {(r.mode, r.length): r.ppl for r in single}
    for length in (16, TINY_TRAINING_SEQLEN):
        assert ppl["none", length] == pytest.approx(ppl["ntk+scaling", length], rel=1e-6)
    assert ppl["none", 256] != pytest.approx(ppl["ntk", 256], rel=1e-3)
    assert ppl["ntk", 256] != pytest.approx(ppl["ntk+scaling", 256], rel=1e-3)
    cell = {(r.mode, r.length): r for r in single}
    assert (cell["ntk+scaling", 256].alpha, cell["none", 256].alpha) == (15, 1)
    assert cell["ntk+scaling", 256].mscale == pytest.approx(1 + 0.1 * math.log(256 / TINY_TRAINING_SEQLEN))


def test_agrees_with_shared_perplexity_tool(tiny_model, stream):
    """Non-overlapping windows score the same tokens as telechat.tools.perplexity (the GPTQ report's tool)."""
    result = evaluate(tiny_model, stream, [100], ["ntk+scaling"], windows=3, prefill_chunk=30, progress=False)[0]
    assert result.ppl == pytest.approx(perplexity(tiny_model, stream[:300], seq_len=100), rel=1e-5)


def test_mode_switch_restores_the_loaded_mode(tiny_ckpt, stream):
    """rope_mode() equals loading with load_model(..., rope_mode=...), and restores the loaded mode."""
    loaded_none = load_model(tiny_ckpt, device="cpu", dtype="float32", rope_mode="none")
    default = load_model(tiny_ckpt, device="cpu", dtype="float32")
    with rope_mode(default, "none"):
        switched = window_nll(default, stream[:200])
    assert default.config.rope_mode == "ntk+scaling"
    assert switched == pytest.approx(window_nll(loaded_none, stream[:200]), rel=1e-6)


def test_markdown_table_shape():
    """Rows = modes, columns = lengths, as the seed's long-context table."""
    from telechat.tools.eval_ppl import PplResult

    rows = [PplResult(m, L, p, math.log(p), 10, 1, 1.0, 1e4, 1.0)
            for m, p0 in (("none", 4.8), ("ntk+scaling", 4.0)) for L, p in ((2048, p0), (98304, p0 * 100))]
    assert markdown_table(rows).splitlines() == [
        "| mode | 2048 | 98304 |", "|---|---:|---:|", "| none | 4.80 | 480.00 |", "| ntk+scaling | 4.00 | 400.00 |"]


def test_parse_lengths():
    assert parse_lengths("4K, 2048,96k,2048") == [2048, 4096, 98304]
    with pytest.raises(UserError, match="not a token count"):
        parse_lengths("2048,lots")


def test_jsonl_formats_encode_like_fine_tuning(tiny_ckpt, tmp_path):
    """Official input/output, OpenAI messages and text/data documents all become one token stream;
    conversations are encoded by the chat format exactly as SFT sees them."""
    from telechat.chat_format import ChatFormat

    tok = load_tokenizer(tiny_ckpt)
    chat = ChatFormat(tok)
    records = [{"input": "<_user>你好", "output": "你好！"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
               {"text": "plain document"}, {"data": "PTD 文档"}]
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    expected = []
    for msgs in ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], records[1]["messages"]):
        expected += [t for p, a in chat.encode_turns(msgs) for t in p + a]
    for doc in ("plain document", "PTD 文档"):
        expected += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    assert load_token_ids(path, tok) == expected
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected keys .*got \['question'\]"):
        load_token_ids(bad, tok)


def test_cli_prints_table_and_writes_json(tiny_ckpt, text_file, tmp_path, capsys):
    """`telechat eval-ppl` prints the Markdown table and writes the same numbers as JSON."""
    out = tmp_path / "res" / "ppl.json"
    code = cli.main(["eval-ppl", "--model", str(tiny_ckpt), "--data", str(text_file), "--lengths", "64,32,128",
                     "--windows", "2", "--chunk", "48", "--output", str(out), "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| mode | 32 | 64 | 128 |" and [row.split(" | ")[0] for row in lines[2:]] == [
        "| none", "| ntk", "| ntk+scaling"]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["table"] == "\n".join(lines)
    assert (report["training_seqlen"], report["base_seqlen"], report["chunk"]) == (TINY_TRAINING_SEQLEN,) * 2 + (48,)
    cells = {(r["mode"], r["length"]): r for r in report["results"]}
    assert len(cells) == 9 and cells["ntk", 128]["tokens"] == 2 * 127 and cells["ntk", 128]["windows"] == 2
    assert float(lines[2].split(" | ")[3].strip(" |")) == pytest.approx(cells["none", 128]["ppl"], rel=1e-3)


def test_cli_overrides_training_seqlen(tiny_ckpt, text_file, tmp_path):
    """--training-seqlen/--base-seqlen reach the model: at 64 tokens all modes coincide again."""
    out = tmp_path / "ppl.json"
    assert main(["--model", str(tiny_ckpt), "--data", str(text_file), "--lengths", "64", "--training-seqlen", "64",
                 "--base-seqlen", "64", "--windows", "1", "--output", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["training_seqlen"] == 64
    assert len({round(r["ppl"], 6) for r in report["results"]}) == 1


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("short", "the data has \\d+ tokens, fewer than the longest length 100000"),
    ("mode", "unknown RoPE mode 'yarn'; choose from none, ntk, ntk\\+scaling"),
])
def test_cli_errors_are_one_clear_line(tiny_ckpt, text_file, tmp_path, capsys, case, message):
    """Missing file, too little text (says how many tokens there are) and bad mode: exit 2, one line."""
    args = {"missing": ["--data", str(tmp_path / "nope.txt"), "--lengths", "64"],
            "short": ["--data", str(text_file), "--lengths", "64,100000"],
            "mode": ["--data", str(text_file), "--lengths", "64", "--modes", "none,yarn"]}[case]
    assert cli.main(["eval-ppl", "--model", str(tiny_ckpt), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0])
