"""A real Prometheus server scrapes a gateway that served known requests; PromQL gives the acceptance rate
computed from the responses, and `promtool check metrics` has nothing to say about `/metrics`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.debian import ensure_program
from tests.harness import (
    FAKE_BACKEND,
    ROOT,
    GatewayProcess,
    chat,
    fake_model_dir,
    free_port,
    running_gateway,
    toml_list,
    wait_for,
)

# Installing Prometheus on a bare machine takes a while; only the first test pays for it.
pytestmark = pytest.mark.timeout(900)

K3 = "speculative/fake-k3"
K5 = "speculative/fake-k5"
BASE = "baseline/fake"
ACCEPTANCE = "sum(specgate_spec_decode_num_accepted_tokens_total) / sum(specgate_spec_decode_num_draft_tokens_total)"


@pytest.fixture(scope="module")
def prometheus_path() -> str:
    return ensure_program("prometheus", "prometheus")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("prom-gw")
    model = fake_model_dir(workdir, "model")
    backend = f"backend = {{ command = {toml_list(FAKE_BACKEND)} }}"
    # Two draft lengths sharing one backend, and a baseline: the query must pool them correctly.
    profiles = f"""
[profiles."{K3}"]
model = "{model}"
draft_model = "{model}"
num_draft_tokens = 3
{backend}

[profiles."{K5}"]
model = "{model}"
draft_model = "{model}"
num_draft_tokens = 5
{backend}

[profiles."{BASE}"]
model = "{model}"
{backend}
"""
    with running_gateway(workdir, profiles) as running:
        yield running


@contextlib.contextmanager
def prometheus(executable: str, workdir: Path, target: str) -> Iterator[str]:
    """Prometheus on a loopback port, scraping `target` every second, with its own throwaway storage."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: specgate
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"""
    )
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                executable,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            return httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200

        wait_for(ready, 30, f"prometheus on {url}")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def instant(prom_url: str, query: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prom_url}/api/v1/query", params={"query": query}, timeout=5.0).json()
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def scalar_value(prom_url: str, query: str) -> float | None:
    result = instant(prom_url, query)
    return float(result[0]["value"][1]) if result else None


def serve_known_requests(gateway: GatewayProcess) -> tuple[int, int, int]:
    """Chat and text, streaming and not, over both draft lengths; the totals the responses reported."""
    drafted = accepted = drafts = 0
    with gateway.client() as client:
        for model, max_tokens in ((K3, 10), (K5, 17), (K3, 23), (K5, 4)):
            reply = client.post("/v1/chat/completions", json=chat("one two three", model, max_tokens=max_tokens))
            assert reply.status_code == 200, reply.text
            figures = reply.json()["metrics"]["speculative_decoding"]
            drafted += figures["num_draft_tokens"]
            accepted += figures["num_accepted_draft_tokens"]
            drafts += figures["num_spec_steps"]
        body = {
            "model": K5,
            "prompt": "a b",
            "max_tokens": 31,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/completions", json=body) as stream:
            usage = [line for line in stream.iter_lines() if '"usage"' in line]
        figures = json.loads(usage[-1][5:])["metrics"]["speculative_decoding"]
        drafted += figures["num_draft_tokens"]
        accepted += figures["num_accepted_draft_tokens"]
        drafts += figures["num_spec_steps"]
        # A baseline request adds tokens but no drafts: it must not move the acceptance rate.
        assert client.post("/v1/chat/completions", json=chat("x", BASE, max_tokens=9)).status_code == 200
    assert 0 < accepted < drafted  # a rate strictly between 0 and 1 proves something
    return drafted, accepted, drafts


def test_promtool_finds_nothing_to_report(gateway: GatewayProcess, prometheus_path: str) -> None:
    serve_known_requests(gateway)
    text = httpx.get(f"{gateway.url}/metrics", timeout=5.0).text
    assert "specgate_spec_decode_num_draft_tokens_total" in text
    promtool = str(Path(prometheus_path).with_name("promtool"))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_promql_acceptance_rate_equals_the_responses(
    gateway: GatewayProcess, prometheus_path: str, tmp_path: Path
) -> None:
    # The counters start from what earlier tests left; read the gateway's own totals first, then add ours.
    def metric_sum(name: str) -> float:
        text = httpx.get(f"{gateway.url}/metrics", timeout=5.0).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    before_drafted = metric_sum("specgate_spec_decode_num_draft_tokens_total")
    before_accepted = metric_sum("specgate_spec_decode_num_accepted_tokens_total")
    before_drafts = metric_sum("specgate_spec_decode_num_drafts_total")
    drafted, accepted, drafts = serve_known_requests(gateway)
    drafted += int(before_drafted)
    accepted += int(before_accepted)
    drafts += int(before_drafts)

    target = gateway.url.removeprefix("http://")
    with prometheus(prometheus_path, tmp_path, target) as prom:
        wait_for(
            lambda: scalar_value(prom, 'up{job="specgate"}') == 1.0,
            30,
            "a successful scrape of the gateway",
            interval=0.25,
        )
        rate = wait_for(lambda: scalar_value(prom, ACCEPTANCE), 30, "the acceptance-rate query", interval=0.25)
        assert rate == pytest.approx(accepted / drafted, rel=1e-12)
        assert scalar_value(prom, "sum(specgate_spec_decode_num_draft_tokens_total)") == drafted
        assert scalar_value(prom, "sum(specgate_spec_decode_num_accepted_tokens_total)") == accepted
        # vLLM's mean acceptance length carries over: 1 + accepted / drafts.
        length = scalar_value(
            prom, "1 + sum(specgate_spec_decode_num_accepted_tokens_total) / sum(specgate_spec_decode_num_drafts_total)"
        )
        assert length == pytest.approx(1 + accepted / drafts, rel=1e-12)
        # Per profile: both draft lengths are there as labels, and the baseline has no drafts.
        by_profile = {
            series["metric"].get("profile"): float(series["value"][1])
            for series in instant(prom, "sum by (profile) (specgate_spec_decode_num_draft_tokens_total)")
        }
        assert by_profile.get(K3, 0) > 0
        assert by_profile.get(K5, 0) > 0
        assert by_profile.get(BASE, 0) == 0
        check_dashboard_queries(prom)


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, its variables filled in as Grafana would."""
    dashboard = json.loads((ROOT / "dashboards" / "specgate.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    fill = {"$__rate_interval": "1m", "$__range": "5m", "$profile": ".*", "$backend": ".*"}
    for name, value in fill.items():
        expressions = [expr.replace(name, value) for expr in expressions]
    return expressions


def check_dashboard_queries(prom_url: str) -> None:
    """Prometheus itself parses each dashboard query (instant query API: 400 on bad PromQL)."""
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    for expr in expressions:
        reply = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=5.0)
        assert reply.status_code == 200, (expr, reply.text)
        assert reply.json()["status"] == "success", expr
    # The backend panels have data as soon as the gateway is scraped once.
    states = instant(prom_url, "max by (backend, state) (specgate_backend_state) == 1")
    assert {series["metric"]["state"] for series in states} == {"ready"}
