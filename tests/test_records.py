"""telechat.records, the one record reader: fine-tuning, GPTQ calibration and eval-ppl read a file alike."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.finetune.data import read_jsonl
from jobs.finetune.dataset import encode
from jobs.quant.calib import calibration_records
from telechat.chat_format import ChatFormat
from telechat.tools.eval_ppl import load_token_ids

RECORDS = [
    {"input": "<_user>你好", "output": "你好！"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"},
]


def test_three_consumers_read_the_same_ids(demo_tokenizer, tmp_path: Path):
    """A conversation file gives the same token ids to fine-tuning, calibration and eval-ppl."""
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n", encoding="utf-8")
    chat = ChatFormat(demo_tokenizer, {})
    finetune = [encode(chat, record.messages)[0].input_ids for record in read_jsonl(path)]
    assert calibration_records(path, chat) == finetune
    assert load_token_ids(path, demo_tokenizer) == [t for ids in finetune for t in ids]
