"""How a reply's text is drawn: LaTeX delimiters Streamlit understands, and the copy button's HTML.

Streamlit's Markdown renders ``$…$`` and ``$$…$$`` with KaTeX; models often write ``\\(…\\)`` and
``\\[…\\]`` instead, so those are rewritten, except inside code, which is shown verbatim.
"""

from __future__ import annotations

import html
import json
import re

# Code is left alone: fenced blocks (also one still open while a reply streams) and inline spans.
_CODE = re.compile(r"(```[\s\S]*?(?:```|$)|~~~[\s\S]*?(?:~~~|$)|`[^`\n]+`)")
_DISPLAY = re.compile(r"\\\[([\s\S]+?)\\\]")
_INLINE = re.compile(r"\\\(([\s\S]+?)\\\)")


def display_markdown(text: str) -> str:
    """``text`` with ``\\[…\\]`` as a ``$$`` block and ``\\(…\\)`` as ``$…$``, outside code."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are prose, odd ones code
        prose = _DISPLAY.sub(lambda m: f"\n$$\n{m.group(1).strip()}\n$$\n", parts[i])
        parts[i] = _INLINE.sub(lambda m: f"${m.group(1).strip()}$", prose)
    return "".join(parts)


# Clipboard API where the page is a secure context (HTTPS, localhost); the older copy command elsewhere
# (a plain-HTTP page opened by the server's address has no navigator.clipboard).
_COPY_SCRIPT = """
<script>
(() => {
  const button = document.getElementById(%(id)s);
  if (!button || button.dataset.ready) return;
  button.dataset.ready = "1";
  button.addEventListener("click", async () => {
    const text = JSON.parse(button.dataset.text);
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      const area = document.createElement("textarea");
      area.value = text;
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = button.dataset.done;
    setTimeout(() => { button.textContent = button.dataset.label; }, 1500);
  });
})();
</script>
"""

_COPY_STYLE = ("border:1px solid rgba(128,128,128,.35);border-radius:.5rem;background:transparent;color:inherit;"
               "font-size:.8rem;padding:.1rem .6rem;cursor:pointer;opacity:.75")


def copy_button_html(text: str, element_id: str, label: str, done_label: str) -> str:
    """A small button that copies ``text`` (the reply's Markdown source) to the clipboard."""
    attr = html.escape
    return (f'<button type="button" id="{attr(element_id)}" class="telechat-copy" style="{_COPY_STYLE}" '
            f'data-text="{attr(json.dumps(text))}" data-label="{attr(label)}" data-done="{attr(done_label)}" '
            f'title="{attr(label)}">{attr(label)}</button>'
            + _COPY_SCRIPT % {"id": json.dumps(element_id)})
