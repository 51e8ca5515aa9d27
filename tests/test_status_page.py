"""The status page at `/` in headless Chromium against a running gateway, and the `/status.json` it reads."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cdp import chromium
from tests.debian import ensure_program
from tests.harness import FAKE_BACKEND, GatewayProcess, chat, fake_model_dir, running_gateway, toml_list

# Installing Chromium on a bare machine takes minutes; only the first test pays for it.
pytestmark = pytest.mark.timeout(900)

SPEC = "speculative/fake-k3"
SLOW = "baseline/slow"


@pytest.fixture(scope="module")
def chromium_path() -> str:
    return ensure_program("chromium", "chromium")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("status")
    model = fake_model_dir(workdir, "model")
    profiles = f"""
[profiles."{SPEC}"]
display_name = "Fake + draft (k=3)"
model = "{model}"
draft_model = "{model}"
num_draft_tokens = 3
backend = {{ command = {toml_list(FAKE_BACKEND)} }}

[profiles."{SLOW}"]
model = "{model}"
backend = {{ command = {toml_list([*FAKE_BACKEND, "--token-delay", "0.05"])} }}
"""
    with running_gateway(workdir, profiles) as running:
        yield running


def ask(gateway: GatewayProcess, model: str, request_id: str, max_tokens: int) -> dict[str, Any]:
    with gateway.client() as client:
        reply = client.post(
            "/v1/chat/completions",
            json=chat("status page check", model, max_tokens=max_tokens),
            headers={"x-request-id": request_id},
        )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_status_json_reports_what_the_responses_reported(gateway: GatewayProcess) -> None:
    first = ask(gateway, SPEC, "json-1", 10)
    second = ask(gateway, SPEC, "json-2", 7)
    status = httpx.get(f"{gateway.url}/status.json", timeout=5).json()
    profile = next(p for p in status["profiles"] if p["name"] == SPEC)
    figures = profile["figures"]
    spec = [r["metrics"]["speculative_decoding"] for r in (first, second)]
    drafted = sum(s["num_draft_tokens"] for s in spec)
    accepted = sum(s["num_accepted_draft_tokens"] for s in spec)
    assert figures["draft_tokens"] == drafted
    assert figures["accepted_tokens"] == accepted
    assert figures["acceptance_rate"] == pytest.approx(accepted / drafted, abs=1e-4)
    assert figures["mean_acceptance_length"] == pytest.approx(
        1 + accepted / sum(s["num_spec_steps"] for s in spec), abs=1e-3
    )
    assert figures["last"]["request_id"] == "json-2"
    assert figures["last"]["tokens_per_second"] == pytest.approx(second["timings"]["predicted_per_second"], rel=1e-3)
    assert profile["state"] == "ready"
    backend = next(b for b in status["backends"] if b["name"] == profile["backend"])
    models = gateway.models()
    assert backend["pid"] == models[SPEC]["backend"]["pid"]
    # The fake backend is a small Python process: tens of MiB resident, read from /proc.
    assert 5 * 2**20 < backend["rss_bytes"] < 500 * 2**20
    # Its own account of its work (the fake keeps no count of abandoned prompts: null).
    assert backend["activity"]["doing"] == "idle"
    assert backend["activity"]["requests_started"] >= 3  # the readiness probe and these two requests
    assert backend["activity"]["prefills_abandoned"] is None
    newest = status["requests"][0]
    assert newest["request_id"] == "json-2"
    assert newest["generation_tokens"] == second["usage"]["completion_tokens"]
    assert newest["acceptance_rate"] == pytest.approx(spec[1]["draft_acceptance_rate"], abs=1e-4)
    assert json.dumps(status)  # plain JSON all the way down
    assert len(httpx.get(f"{gateway.url}/status.json", params={"requests": 1}, timeout=5).json()["requests"]) == 1


PROFILE_ROW = "document.querySelector(`tr[data-profile='${CSS.escape(%s)}']`)"


def cell(profile: str, field: str) -> str:
    row = PROFILE_ROW % json.dumps(profile)
    return f"({row}?.querySelector('[data-field={field}]')?.textContent ?? null)"


def test_page_shows_a_profile_that_just_served_with_its_figures(
    gateway: GatewayProcess, chromium_path: str, tmp_path: Path
) -> None:
    body = ask(gateway, SPEC, "page-check-1", 10)
    status = httpx.get(f"{gateway.url}/status.json", timeout=5).json()
    figures = next(p for p in status["profiles"] if p["name"] == SPEC)["figures"]
    backend_pid = gateway.models()[SPEC]["backend"]["pid"]

    with chromium(chromium_path, tmp_path) as browser:
        page = browser.open(f"{gateway.url}/")
        page.wait_for("document.body.dataset.loaded === 'true'", 20, "the page's first refresh")
        assert page.evaluate("document.title") == "specgate status"
        assert page.evaluate(cell(SPEC, "state")) == "ready"
        # The figures the page shows are the ones the gateway computed from the responses.
        assert page.evaluate(cell(SPEC, "acceptance")) == f"{figures['acceptance_rate'] * 100:.1f}%"
        assert page.evaluate(cell(SPEC, "served")) == str(figures["served"])
        assert page.evaluate(cell(SPEC, "ttft")) == f"{figures['ttft_ms_median']:.1f}"
        assert page.evaluate(cell(SPEC, "tps")) == f"{figures['tokens_per_second_mean']:.1f}"
        assert page.evaluate(cell(SPEC, "mean-acceptance-length")) == f"{figures['mean_acceptance_length']:.2f}"
        # This request's own row, with the acceptance its response reported.
        rate = body["metrics"]["speculative_decoding"]["draft_acceptance_rate"]
        request_row = "document.querySelector(`tr[data-request-id='page-check-1'] [data-field=acceptance]`)"
        assert page.evaluate(f"{request_row}?.textContent") == f"{rate * 100:.1f}%"
        # Its backend, with the pid the gateway reports and a resident size.
        backend_cell = "document.querySelector(`tr[data-backend='${CSS.escape(%s)}'] [data-field=%s]`)?.textContent"
        backend_name = json.dumps(next(p for p in status["profiles"] if p["name"] == SPEC)["backend"])
        assert page.evaluate(backend_cell % (backend_name, "pid")) == str(backend_pid)
        assert page.evaluate(backend_cell % (backend_name, "rss")).endswith("MiB")
        # What the backend says it works on, asked at each refresh: nothing now.
        assert page.evaluate(backend_cell % (backend_name, "doing")) == "idle"
        # The log tail shows the backend's line for this request.
        page.wait_for(
            "document.getElementById('log').textContent.includes('request id=page-check-1 ')",
            10,
            "the request's line in the log tail",
        )

        # The page refreshes itself: a new request shows up without a reload.
        ask(gateway, SPEC, "page-check-2", 4)
        page.wait_for(
            "!!document.querySelector(`tr[data-request-id='page-check-2']`)", 10, "the second request after a refresh"
        )
        assert page.evaluate(cell(SPEC, "served")) == str(figures["served"] + 1)

        # A request in flight on the slow profile appears live, with its tokens so far.
        done = threading.Event()
        worker = threading.Thread(target=lambda: (ask(gateway, SLOW, "live-1", 80), done.set()), daemon=True)
        worker.start()
        live = page.wait_for(
            f"(({cell(SLOW, 'live')}) || '').includes('live-1: generating')", 15, "the in-flight request"
        )
        assert live
        worker.join(timeout=30)
        assert done.is_set()
        assert page.errors() == []
        assert browser.process.poll() is None, browser.stderr()[-2000:]


def test_page_reports_an_unreachable_gateway_on_the_page_not_the_console(
    gateway: GatewayProcess, chromium_path: str, tmp_path: Path
) -> None:
    """A gateway that goes away is a state the page shows, not a script error."""
    import http.server

    html = httpx.get(f"{gateway.url}/", timeout=5).text

    class PageOnly(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                data = html.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html")
            else:  # the gateway "went away": its JSON answers 502, as a proxy in front would
                data = b"bad gateway"
                self.send_response(502)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with chromium(chromium_path, tmp_path) as browser:
            page = browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
            text = page.wait_for(
                "getComputedStyle(document.getElementById('banner')).display === 'block' && "
                "document.getElementById('banner').textContent",
                15,
                "the banner",
            )
            assert "cannot reach the gateway" in text
            assert "502" in text
            # The failed fetch is logged by the browser itself as a failed load; nothing else is.
            assert all("status of 502" in error for error in page.errors()), page.errors()
    finally:
        server.shutdown()
        server.server_close()
