"""Labels: both languages complete, same placeholders, every key the page uses exists."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

import services.web.client as client_mod
from services.web import i18n
from services.web.client import APIError

PAGE = [Path(i18n.__file__).with_name(name) for name in ("app.py", "chat_list.py", "auth.py")]


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("key", sorted(i18n.label_keys()))
def test_label_has_both_languages_with_same_fields(key: str) -> None:
    zh, en = i18n.t(key, "zh"), i18n.t(key, "en")
    assert zh.strip() and en.strip()
    assert _fields(zh) == _fields(en)


def test_every_key_the_page_uses_exists() -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for path in PAGE)
    used = set(re.findall(r"""\bt\(\s*["']([a-z_0-9]+)["']""", source))
    used |= set(re.findall(r"""["'](example_\d)["']""", source))
    used |= set(re.findall(r"""notify\(\s*["']([a-z_0-9]+)["']""", source))
    assert used, "no labels found: did the page stop using t()?"
    used |= set(i18n.CUT_LABELS.values())
    assert used <= i18n.label_keys(), used - i18n.label_keys()


def test_every_error_type_has_a_sentence() -> None:
    errors = [c for c in vars(client_mod).values() if isinstance(c, type) and issubclass(c, APIError)]
    assert len(errors) >= 8
    for cls in errors:
        assert cls.key in i18n.label_keys(), cls
        for lang in i18n.LANGS:
            assert "{" not in i18n.error_text(cls("x"), lang, api_url="http://a")


def test_chinese_is_the_default() -> None:
    assert i18n.DEFAULT_LANG == "zh"
    assert i18n.t("stop", "zh") == "停止生成"
