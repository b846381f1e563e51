"""The ``telechat`` command: generate on the demo model, doctor, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, telechat


def test_generate_prints_a_reply_and_labels_the_demo(demo_model_dir):
    """`telechat generate --model DEMO --prompt 你好` prints text on stdout and a demo label on stderr."""
    done = telechat("generate", "--model", str(demo_model_dir), "--prompt", "你好", "--max-tokens", "32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "\ufffd" not in done.stdout
    assert "demo model" in done.stderr


def test_doctor_reports_a_valid_and_an_invalid_folder(demo_model_dir, tmp_path):
    """doctor exits 0 and describes a good folder; exits 1 naming the problem for a bad one."""
    good = telechat("doctor", "--model", str(demo_model_dir))
    assert good.returncode == 0 and "DEMO" in good.stdout and "NTK base length 4096" in good.stdout
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    bad = telechat("doctor", "--model", str(tmp_path))
    assert bad.returncode == 1 and "INVALID" in bad.stdout and "LlamaForCausalLM" in bad.stdout


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path):
    """A missing model folder or an unknown command: exit 2 and one line saying what to fix, no traceback."""
    missing = telechat("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = telechat("frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_web_command_needs_no_torch():
    """In a web-only install (no torch, no transformers) `telechat web --help` works and model commands
    name the extra to install."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from telechat.cli import main\n"
            "print('generate', main(['generate', '--prompt', 'x']))\n"
            "main(['web', '--help'])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "generate 2" in done.stdout and "--api-url" in done.stdout
    assert "needs the 'core' extra" in done.stderr


def test_chat_keeps_history_clears_and_exits(demo_model_dir):
    """`telechat chat` answers each line, `/clear` forgets the conversation, `/exit` quits with 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "telechat.cli", "chat", "--model", str(demo_model_dir),
                           "--max-tokens", "24"], cwd=REPO, env=env, input="你好\n/clear\nHello\n/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "DEMO MODEL" in out and "(conversation cleared)" in out
    replies = [line.removeprefix("bot> ") for line in out.splitlines() if "bot> " in line]
    assert len(replies) == 2 and all(r.strip() for r in replies)
