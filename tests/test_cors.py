"""CORS: a page from an allowed origin calls the API and reads a stream with an
`EventSource` and its stream token; any other origin is refused by the browser.
Off unless ``TOKENBUS_CORS_ALLOW_ORIGINS`` names origins."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from schemas import GenerationRequest
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, ServerSettings

from .browser_support import chromium, new_page
from .conftest import eventually, serving
from .test_fanout import TOKENS, publish_stream

from playwright.async_api import Browser, Page  # isort: skip  (after the skip above)

KEY = "sk-cors-test"
PAGE_ORIGIN = f"http://127.0.0.1:{free_port()}"  # another port: another origin


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


def test_origins_are_read_comma_separated() -> None:
    settings = ServerSettings(cors_allow_origins="https://a.example, http://localhost:3000/")
    assert settings.cors_allow_origins == ["https://a.example", "http://localhost:3000"]


async def test_a_preflight_is_answered_for_allowed_origins_only(kafka: KafkaSettings) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    async with serving(kafka, api_keys={KEY: "acme"}, cors_allow_origins=[PAGE_ORIGIN]) as (
        _,
        http,
    ):
        allowed = await http.options("/v1/requests", headers={"Origin": PAGE_ORIGIN, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == PAGE_ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = await http.options(
            "/v1/requests", headers={"Origin": "https://evil.example", **preflight}
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        # A refusal carries the header too, so the page can read why.
        refused = await http.get("/v1/models", headers={"Origin": PAGE_ORIGIN})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == PAGE_ORIGIN
    async with serving(kafka, api_keys={KEY: "acme"}) as (_, http):
        off = await http.options("/v1/requests", headers={"Origin": PAGE_ORIGIN, **preflight})
        assert "access-control-allow-origin" not in off.headers


async def test_an_event_source_on_another_origin_reads_a_stream_with_its_token(
    kafka: KafkaSettings, browser: Browser
) -> None:
    async with (
        serving(kafka, api_keys={KEY: "acme"}, cors_allow_origins=[PAGE_ORIGIN]) as (url, http),
        new_page(browser) as page,
    ):
        await _open_page(page)
        accepted = await page.evaluate(_SUBMIT, {"url": url, "key": KEY})
        assert accepted["status"] == 202, accepted
        body = accepted["body"]
        stream = {"url": url + body["events_url"], "token": body["stream_token"]}
        reading = asyncio.create_task(page.evaluate(_READ, stream))
        await eventually(lambda: _subscribers(http, 1))  # read live, as it is written
        request = GenerationRequest(request_id=body["request_id"], prompt="p", tenant="acme",
                                    submitted_at=body["submitted_at"])  # fmt: skip
        await publish_stream(kafka, request)
        result = await reading
        assert result["error"] is None
        assert result["seqs"] == list(range(TOKENS + 2))
        assert result["last"] == "finished"


async def test_an_origin_not_allowed_cannot_read_the_stream(
    kafka: KafkaSettings, browser: Browser
) -> None:
    async with (
        serving(kafka, api_keys={KEY: "acme"}, cors_allow_origins=["https://app.example"]) as (
            url,
            http,
        ),
        new_page(browser) as page,
    ):
        response = await http.post(
            "/v1/requests", json={"prompt": "p"}, headers={"Authorization": f"Bearer {KEY}"}
        )
        body = response.json()
        await _open_page(page)
        submit = await page.evaluate(_SUBMIT, {"url": url, "key": KEY})
        assert submit["status"] == "blocked"
        result = await page.evaluate(
            _READ, {"url": url + body["events_url"], "token": body["stream_token"]}
        )
        assert result["error"] == "error" and result["seqs"] == []


async def _subscribers(http: httpx.AsyncClient, count: int) -> bool:
    headers = {"Authorization": f"Bearer {KEY}"}
    metrics = (await http.get("/metrics", headers=headers)).text
    return f"tokenbus_relay_subscribers {count}.0" in metrics.splitlines()


async def _open_page(page: Page) -> None:
    await page.goto(f"{PAGE_ORIGIN}/")


@pytest.fixture(autouse=True)
def page_server() -> Iterator[None]:
    """A blank page served from PAGE_ORIGIN by a real server on loopback: Chromium
    lets a loopback page reach the relay on loopback (a page from anywhere else
    needs the user's permission for the local network, on top of CORS)."""

    class Blank(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another origin</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", int(PAGE_ORIGIN.rsplit(":", 1)[1])), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


_SUBMIT = """async ({url, key}) => {
  try {
    const resp = await fetch(url + "/v1/requests", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({prompt: "p", max_tokens: 4})});
    return {status: resp.status, body: await resp.json()};
  } catch (err) { return {status: "blocked", body: String(err)}; }
}"""

_READ = """({url, token}) => new Promise(resolve => {
  const seqs = [];
  const source = new EventSource(url + "?token=" + encodeURIComponent(token));
  for (const type of ["started", "token"]) {
    source.addEventListener(type, e => seqs.push(JSON.parse(e.data).seq));
  }
  source.addEventListener("finished", e => {
    seqs.push(JSON.parse(e.data).seq); source.close();
    resolve({seqs, last: "finished", error: null});
  });
  source.onerror = () => { source.close(); resolve({seqs, last: null, error: "error"}); };
})"""
