"""Headless Chromium for end-to-end tests: Debian's /usr/bin/chromium driven by Playwright's
async API inside the test's own event loop; no browser is ever downloaded."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
TIMEOUT_MS = 15_000


@asynccontextmanager
async def chromium_context() -> AsyncIterator[BrowserContext]:
    """A fresh browser and context (no cookies), closed afterwards."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            ctx = await browser.new_context(viewport={"width": 1000, "height": 760})
            ctx.set_default_timeout(TIMEOUT_MS)
            try:
                yield ctx
            finally:
                await ctx.close()
        finally:
            await browser.close()
