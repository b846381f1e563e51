"""Bad data refuses to start: every malformed line is reported as file:line, the exit code is non-zero."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from jobs.finetune.cli import EXIT_USAGE, main
from jobs.finetune.data import DataError, load_conversations, read_jsonl

GOOD_OFFICIAL = json.dumps({"input": "<_user>你好", "output": "你好！"}, ensure_ascii=False)
GOOD_MESSAGES = json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_good_official_and_messages_lines_parse(tmp_path: Path):
    convs = read_jsonl(write(tmp_path / "ok.jsonl", [GOOD_OFFICIAL, "", GOOD_MESSAGES]))
    assert [c.source.rsplit(":", 1)[1] for c in convs] == ["1", "3"]
    assert convs[0].messages == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert convs[1].messages[0] == {"role": "system", "content": "be brief"}


def test_every_bad_line_is_reported_with_file_and_line(tmp_path: Path):
    bad = write(tmp_path / "bad.jsonl", [
        GOOD_OFFICIAL,                                                     # 1 ok
        '{"input": "<_user>q", "output": "a"',                            # 2 broken JSON
        json.dumps({"input": "<_user>q<_user>q2", "output": "a"}),          # 3 marker mismatch
        json.dumps({"input": "<_user>only a prompt"}),                     # 4 no output
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),      # 5 no answer
        json.dumps({"messages": [{"role": "robot", "content": "q"}]}),     # 6 unknown role
        json.dumps({"text": "hello"}),                                     # 7 unknown keys
        b'{"input": "\xff", "output": "a"}',                               # 8 not UTF-8
        json.dumps(["a", "b"]),                                            # 9 not an object
    ])
    with pytest.raises(DataError) as err:
        read_jsonl(bad)
    message = str(err.value)
    assert message.startswith("8 malformed line(s)")
    # the parser stops at the end of line 2, one past its last character (not "line 2 column 1")
    column = len('{"input": "<_user>q", "output": "a"') + 1
    assert f"{bad}:2: not valid JSON at column {column}: Expecting ',' delimiter" in message
    for line in range(2, 10):
        assert f"{bad}:{line}: " in message
    assert f"{bad}:1:" not in message
    assert "marker mismatch" in message and "no 'output'" in message and "not UTF-8" in message


def test_official_prompt_file_is_refused(official_sft):
    """test.jsonl holds prompts without answers: refuse it rather than train on nothing."""
    with pytest.raises(DataError, match=r"test\.jsonl:1: has 'input' but no 'output'"):
        read_jsonl(official_sft["test"])


def test_data_json_mix_weights_and_errors(tmp_path: Path):
    (tmp_path / "datas").mkdir()
    write(tmp_path / "datas" / "a.jsonl", [GOOD_OFFICIAL] * 10)
    write(tmp_path / "datas" / "b.jsonl", [GOOD_MESSAGES] * 10)
    mix = tmp_path / "data.json"
    mix.write_text(json.dumps({"datas/a.jsonl": 2.0, "datas/b.jsonl": 1.0}))
    convs, _ = load_conversations(mix, seed=1)
    assert len(convs) == 30  # whole weights: exact copies
    assert sum(c.source.startswith(str(tmp_path / "datas" / "a.jsonl")) for c in convs) == 20

    mix.write_text(json.dumps({"datas/a.jsonl": 0.5}))
    assert 0 < len(load_conversations(mix, seed=1)[0]) < 10  # each kept with probability 0.5

    write(tmp_path / "datas" / "c.jsonl", [GOOD_OFFICIAL, "{oops"])
    mix.write_text(json.dumps({"datas/a.jsonl": 1, "datas/c.jsonl": 1, "datas/missing.jsonl": 1, "datas/b.jsonl": -1}))
    with pytest.raises(DataError) as err:
        load_conversations(mix, seed=1)
    assert "missing.jsonl': no such file" in str(err.value) and "weight must be a positive number" in str(err.value)
    mix.write_text(json.dumps({"datas/a.jsonl": 1, "datas/c.jsonl": 1}))
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        load_conversations(mix, seed=1)


def test_cli_refuses_to_start_on_bad_data(tmp_path: Path, tiny_model_dir: Path, caplog):
    """The command exits non-zero, names file:line, and writes no checkpoint."""
    bad = write(tmp_path / "bad.jsonl", [GOOD_OFFICIAL, '{"input": "<_user>q"}'])
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = main(["--method", "lora", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(out)])
    assert code == EXIT_USAGE != 0
    assert f"{bad}:2: has 'input' but no 'output'" in caplog.text
    assert not out.exists()  # nothing written: the corrected run needs no --overwrite


def test_held_out_conversations_are_never_trained(official_sft, tmp_path: Path):
    """With data.json weights >= 2, the eval split is taken before the copies: no held-out
    conversation is trained on, and each is held out once."""
    mix = tmp_path / "data.json"
    mix.write_text(json.dumps({str(official_sft["single"]): 2.0, str(official_sft["multi"]): 1.0}))
    train, held_out = load_conversations(mix, seed=42, eval_split=0.02)
    single, multi = (len(official_sft[k].read_text(encoding="utf-8").splitlines()) for k in ("single", "multi"))
    assert len(held_out) == round(0.02 * (single + multi)) == len({c.source for c in held_out})
    assert not {c.source for c in held_out} & {c.source for c in train}
    # The rest once each, the single-turn ones twice.
    assert 2 * single + multi - 2 * len(held_out) <= len(train) <= 2 * single + multi - len(held_out)
