"""The web UI in Chromium, for the container lane: open the page, wait until it shows the served model's
id (the page got it from the API at API_URL), save a screenshot.

    python page.py URL MODEL_ID SCREENSHOT.png
"""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import sync_playwright


def main(url: str, model: str, screenshot: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            try:
                page.wait_for_function("m => document.body.innerText.includes(m)", arg=model, timeout=90_000)
            finally:
                page.screenshot(path=screenshot)
            print(f"the page shows {model}")
        finally:
            browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
