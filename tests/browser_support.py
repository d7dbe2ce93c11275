"""A real browser for the tests of the web console: Debian's Chromium
(``/usr/bin/chromium``, installed by ``scripts/test``), driven by Playwright, which
uses it instead of downloading a browser of its own (that download fails here)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("TOKENBUS_TEST_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: scripts/test installs Debian's chromium "
        "(or set TOKENBUS_TEST_CHROMIUM to one)",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def new_page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a context of its own: its own sessionStorage, as a new tab."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        yield await context.new_page()
    finally:
        await context.close()
