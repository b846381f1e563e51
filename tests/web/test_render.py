"""How replies are drawn: LaTeX delimiters KaTeX understands, code left verbatim, a safe copy button."""

from __future__ import annotations

import html
import json
import re

from services.web.render import copy_button_html, display_markdown


def test_latex_delimiters_become_dollars() -> None:
    assert display_markdown(r"Euler: \(e^{i\pi} + 1 = 0\).") == "Euler: $e^{i\\pi} + 1 = 0$."
    assert display_markdown(r"Energy \[ E = mc^2 \] here") == "Energy \n$$\nE = mc^2\n$$\n here"
    assert display_markdown("$x$ and $$y$$ stay") == "$x$ and $$y$$ stay"


def test_code_is_left_alone() -> None:
    text = "```latex\n\\(a\\)\n```\nthen `\\(b\\)` and \\(c\\)"
    assert display_markdown(text) == "```latex\n\\(a\\)\n```\nthen `\\(b\\)` and $c$"
    streaming = "intro \\(x\\)\n```python\nprint('\\(y\\)')"  # a fence still open while the reply streams
    assert display_markdown(streaming) == "intro $x$\n```python\nprint('\\(y\\)')"


def test_copy_button_carries_the_text_safely() -> None:
    text = 'He said "hi" </script><script>alert(1)</script> & 你好'
    markup = copy_button_html(text, "copy-7", "复制", "已复制")
    attribute = re.search(r'data-text="([^"]*)"', markup).group(1)
    assert json.loads(html.unescape(attribute)) == text
    assert markup.count("<script>") == 1, "the text cannot open a script of its own"
    assert 'id="copy-7"' in markup and 'getElementById("copy-7")' in markup
