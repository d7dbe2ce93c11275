"""The web console at ``/``, in a real browser (Chromium driven by Playwright),
against the real relay, broker and model: submit, watch the tokens arrive, stop,
several requests at once, reload and resume from the address, replay at the
original pace with its timing plot, and sign in with a key."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from producers import TokenbusClient
from schemas import uuid7
from tokenbus.bus.settings import AuditSettings, KafkaSettings
from workers import LoadedModel

from .audit_support import auditing
from .browser_support import chromium, new_page
from .conftest import assert_complete, collect, eventually, serving, text_of, working

from playwright.async_api import Browser, Page, expect  # isort: skip  (after the skip above)

KEY = "sk-console-test"
WAIT_MS = 90_000  # generation on a CPU: the deadline of every wait on the page


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


async def submit(page: Page, prompt: str, max_tokens: int) -> str:
    """Submit from the form; the new pane's request id."""
    await page.get_by_label("Prompt").fill(prompt)
    await page.get_by_label("Max tokens").fill(str(max_tokens))
    await page.get_by_label("Temperature").fill("0")
    await page.get_by_role("button", name="Submit").click()
    status = page.locator("#submit-status")
    await expect(status).to_have_text(re.compile(r"accepted [0-9a-f-]{36}"), timeout=WAIT_MS)
    return (await status.inner_text()).split()[-1]


def pane(page: Page, request_id: str):  # type: ignore[no-untyped-def]  # playwright's Locator
    return page.locator(f'.pane[data-request-id="{request_id}"]')


async def test_submit_stop_several_at_once_reload_and_replay(
    kafka: KafkaSettings, smollm: LoadedModel, browser: Browser
) -> None:
    async with (
        serving(kafka) as (url, _),
        working(kafka, smollm),
        new_page(browser) as page,
        TokenbusClient(url) as client,
    ):
        await page.goto(url)
        await expect(page.locator("#who")).to_have_text("no key needed", timeout=WAIT_MS)

        # A long one, stopped once its first tokens are on the page.
        long = await submit(page, "Tell me a long story about a lighthouse keeper.", 1000)
        await expect(pane(page, long).locator(".output")).not_to_be_empty(timeout=WAIT_MS)
        await pane(page, long).get_by_role("button", name="Stop").click()
        await expect(pane(page, long)).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)

        # Two at once, each in its own pane: the text of each is its own stream's.
        first = await submit(page, "Name three colours.", 12)
        second = await submit(page, "Count from one to five.", 12)
        for request_id in (first, second):
            await expect(pane(page, request_id)).to_have_attribute(
                "data-state", re.compile("stop|length"), timeout=WAIT_MS
            )
        texts = {}
        for request_id in (long, first, second):
            events = await collect(client, uuid.UUID(request_id))
            assert_complete(events)
            texts[request_id] = text_of(events)
            assert await pane(page, request_id).locator(".output").inner_text() == texts[request_id]
        assert texts[first] != texts[second]

        # The address holds the panes: a reload replays each from the log.
        assert set(page.url.split("#", 1)[1].split(",")) == {long, first, second}
        await page.reload()
        for request_id, text in texts.items():
            await expect(pane(page, request_id).locator(".output")).to_have_text(
                text, timeout=WAIT_MS
            )
        await expect(pane(page, long)).to_have_attribute("data-state", "cancelled")

        # Replay at the original pace: the same text, and a plot of its timing.
        await pane(page, first).get_by_role("button", name="Replay at original pace").click()
        await expect(pane(page, first).locator(".output")).to_have_text(
            texts[first], timeout=WAIT_MS
        )
        await expect(pane(page, first).locator(".timing")).to_contain_text("TTFT")
        tokens = len([e for e in await collect(client, uuid.UUID(first)) if e.type == "token"])
        await expect(pane(page, first).locator(".plot svg rect")).to_have_count(tokens - 1)

        # Open by id, in a new tab (its own storage): the shared link works too.
        async with new_page(browser) as other:
            await other.goto(f"{url}/#{second}")
            await expect(pane(other, second).locator(".output")).to_have_text(
                texts[second], timeout=WAIT_MS
            )


async def test_a_keyed_server_asks_for_a_key_and_the_tab_keeps_it_to_itself(
    kafka: KafkaSettings, smollm: LoadedModel, browser: Browser
) -> None:
    async with (
        serving(kafka, api_keys={KEY: "acme"}) as (url, _),
        working(kafka, smollm),
        new_page(browser) as page,
    ):
        await page.goto(url)
        who = page.locator("#who")
        await expect(who).to_contain_text("needs an API key", timeout=WAIT_MS)

        await page.get_by_label("API key").fill("sk-wrong")
        await page.get_by_role("button", name="Sign in").click()
        await expect(who).to_contain_text("that key was refused")

        await page.get_by_label("API key").fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await expect(who).to_have_text("signed in")
        request_id = await submit(page, "Say hello.", 8)
        await expect(pane(page, request_id)).to_have_attribute(
            "data-state", re.compile("stop|length"), timeout=WAIT_MS
        )
        assert await page.evaluate("localStorage.length") == 0  # the tab's storage only

        # The link in another tab: nothing shown until it signs in, then the stream.
        async with new_page(browser) as other:
            await other.goto(f"{url}/#{request_id}")
            await expect(other.locator("#who")).to_contain_text("needs an API key")
            await expect(other.locator(".pane")).to_have_count(0)
            await other.get_by_label("API key").fill(KEY)
            await other.get_by_role("button", name="Sign in").click()
            await expect(pane(other, request_id)).to_have_attribute(
                "data-state", re.compile("stop|length"), timeout=WAIT_MS
            )


async def test_the_audit_view_of_a_request_in_its_pane(
    kafka: KafkaSettings, smollm: LoadedModel, browser: Browser, tmp_path: Path
) -> None:
    store, key = str(tmp_path / "audit.db"), Ed25519PrivateKey.generate()
    audit = AuditSettings(store=store, public_key=key.public_key().public_bytes_raw().hex())
    async with (
        serving(kafka, audit=audit) as (url, http),
        working(kafka, smollm),
        auditing(kafka, store, key),
        new_page(browser) as page,
    ):
        await page.goto(url)
        request_id = await submit(page, "What is an audit trail?", 8)
        await expect(pane(page, request_id)).to_have_attribute(
            "data-state", re.compile("stop|length"), timeout=WAIT_MS
        )

        async def audited() -> bool:  # the consumer has read the whole stream
            response = await http.get(f"/v1/requests/{request_id}/audit")
            return response.status_code == 200 and response.json()["outcome"] is not None

        await eventually(audited)
        await pane(page, request_id).get_by_role("button", name="Audit").click()
        table = pane(page, request_id).get_by_role("table")
        await expect(table).to_have_attribute("data-verified", "true", timeout=WAIT_MS)
        await expect(table).to_contain_text("What is an audit trail?")
        await expect(table).to_contain_text("worker-1 (attempt")
        await expect(table).to_contain_text("SmolLM2-135M-Instruct revision")
        await expect(table.get_by_role("row", name=re.compile("^chain verifies"))).to_have_count(1)


async def test_bad_input_and_unknown_ids_are_shown_not_left_generating(
    kafka: KafkaSettings, browser: Browser
) -> None:
    async with serving(kafka) as (url, _), new_page(browser) as page:
        await page.goto(url)
        await expect(page.locator("#who")).to_have_text("no key needed", timeout=WAIT_MS)
        await page.get_by_label("Stop (comma-separated)").fill("a, b, c, d, e")  # 4 at most
        await page.get_by_role("button", name="Submit").click()
        status = page.locator("#submit-status")
        await expect(status).to_contain_text("422", timeout=WAIT_MS)
        assert "error" in (await status.get_attribute("class") or "")

        missing = str(uuid7())  # well-formed, never submitted
        await page.get_by_label("Request id").fill(missing)
        await page.get_by_role("button", name="Open").click()
        await expect(pane(page, missing).locator(".status")).to_contain_text("404", timeout=WAIT_MS)
