"""What a client sends stays with its request: bodies are UTF-8 JSON or a 400, nothing of a request reaches
`/status.json` or the request log, log lines escape control characters, and a client that leaves while
uploading is counted as gone, without a traceback (issue 19 items 4, 9 and 13).

A real gateway with API keys on, in front of the fake backend (a backend's answers do not matter here, except
for one profile whose backend rejects every request), once with text logs and once with JSON logs.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.proxy.record import ERROR_CHARS, RequestRecord
from tests.harness import GatewayProcess, chat, fake_model_dir, fake_profile, running_gateway, wait_for

KEY = "sk-client-text-test"
AUTH = {"authorization": f"Bearer {KEY}"}
SECRET = "zebra-umbrella-47"
MODEL = "fake"
REJECTS = "rejects"  # its backend answers every chat completion 404, quoting the request's text
REFUSES = "refuses"  # the same with 400


@pytest.fixture(scope="module", params=["text", "json"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp(f"client-text-{request.param}")
    model = fake_model_dir(workdir)
    profiles = fake_profile(MODEL, model, sampling="{ max_tokens = 4 }")
    profiles += fake_profile(REJECTS, model, "--fail-chat-with", "404")
    profiles += fake_profile(REFUSES, model, "--fail-chat-with", "400")
    env = {"SPECGATE_API_KEYS": KEY, "SPECGATE_LOG_FORMAT": request.param}
    with running_gateway(workdir, profiles, env) as running:
        yield running


def serves(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        reply = client.post("/v1/chat/completions", json=chat("still here", MODEL), headers=AUTH)
        assert reply.status_code == 200, reply.text


def outcome_total(gateway: GatewayProcess, outcome: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "specgate_requests":
            total += sum(
                s.value for s in family.samples if s.name.endswith("_total") and s.labels["outcome"] == outcome
            )
    return total


# ----- bodies: UTF-8 JSON or 400 ---------------------------------------------------------------------


def body_text(content: str) -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}, ensure_ascii=False)


NOT_UTF8_JSON: dict[str, bytes] = {
    # The case: json.loads(bytes) read UTF-16 and let a lone surrogate past the check; 500, and the
    # stored error was the repr of the whole body.
    "utf-16 with a lone surrogate": body_text(f"\ud800 {SECRET}").encode("utf-16", "surrogatepass"),
    "utf-16-le": body_text(SECRET).encode("utf-16-le"),
    "utf-16-be": body_text(SECRET).encode("utf-16-be"),
    "utf-32": body_text(SECRET).encode("utf-32"),
    "latin-1": body_text(f"café {SECRET}").encode("latin-1"),
    "surrogate bytes (CESU-8)": body_text(f"\ud800 {SECRET}").encode("utf-8", "surrogatepass"),
    "overlong slash": body_text(SECRET).encode().replace(b"zebra", b"zebra\xc0\xaf"),
    "escaped lone high surrogate": body_text(SECRET).encode().replace(b"zebra", b"\\ud800zebra"),
    "escaped lone low surrogate": body_text(SECRET).encode().replace(b"zebra", b"\\uDC00zebra"),
    "escaped pair reversed": body_text(SECRET).encode().replace(b"zebra", b"\\udc00\\ud800zebra"),
    "surrogate in a key": body_text(SECRET).encode().replace(b'"model"', b'"\\ud83d": 1, "model"'),
    "surrogate in the model name": body_text(SECRET).encode().replace(b'"fake"', b'"\\udfff' + SECRET.encode() + b'"'),
    "UTF-8 byte order mark": b"\xef\xbb\xbf" + body_text(SECRET).encode(),
}


def test_bodies_that_are_not_utf8_json_are_400_and_leave_no_trace(gateway: GatewayProcess) -> None:
    internal_before = outcome_total(gateway, "internal_error")
    with gateway.client() as client:
        for name, body in NOT_UTF8_JSON.items():
            for path in ("/v1/chat/completions", "/v1/completions"):
                headers = {**AUTH, "content-type": "application/json"}
                reply = client.post(path, content=body, headers=headers)
                assert reply.status_code == 400, (name, path, reply.text)
                assert reply.json()["error"]["type"] == "invalid_request_error", (name, reply.text)
            serves(gateway)
        # Said outright, another charset is refused before the body is read.
        utf16 = {**AUTH, "content-type": "application/json; charset=utf-16"}
        reply = client.post("/v1/chat/completions", content=NOT_UTF8_JSON["utf-16-le"], headers=utf16)
        assert reply.status_code == 415
        status = client.get("/status.json").text
    assert outcome_total(gateway, "internal_error") == internal_before
    assert SECRET not in status
    assert SECRET not in gateway.log()


@pytest.mark.parametrize(("status", "client_sees_it"), [(404, True), (400, False)])
def test_backend_text_stays_out_of_records(gateway: GatewayProcess, status: int, client_sees_it: bool) -> None:
    """A backend's error can quote the request: not in /status.json or the request's log line. The client that
    sent the request gets a 404's text (a template or generation error); a 400's stays out of the answer
    too (mlx_lm's image fetches answer 400 with what an internal address said)."""
    quoted = f"quoted-by-the-backend-{status}"
    profile = REJECTS if status == 404 else REFUSES
    with gateway.client() as client:
        reply = client.post("/v1/chat/completions", json=chat(quoted, profile), headers=AUTH)
        assert reply.status_code == 400, reply.text
        assert (quoted in reply.json()["error"]["message"]) == client_sees_it, reply.text
        request_id = reply.headers["x-request-id"]
        status_page = client.get("/status.json").json()
    records = [r for r in status_page["requests"] if r["request_id"] == request_id]
    assert len(records) == 1, records
    assert quoted not in json.dumps(status_page)
    assert f"HTTP {status}" in records[0]["error"]
    request_lines = [line for line in gateway.log().splitlines() if f"{request_id} {profile} " in line]
    assert len(request_lines) == 1, request_lines
    assert f"HTTP {status}" in request_lines[0]
    assert quoted not in request_lines[0]


def test_records_bound_what_they_hold() -> None:
    record = RequestRecord("r", "p", "m", None, "chat", False, None)
    record.error = "backend said: " + "\n\x1b[2J" + "x" * (4 << 20)
    record.finish_reason = "stop" * 1000
    record.token_gaps = [0.01] * 100_000
    record.seal()
    record.drop_token_gaps()
    assert record.error is not None
    assert len(record.error) <= ERROR_CHARS
    assert not re.search(r"[\x00-\x1f\x7f]", record.error)
    assert record.error.startswith("backend said: ")
    assert record.finish_reason is not None
    assert len(record.finish_reason) <= 40
    assert record.token_gaps == []


# ----- log lines -------------------------------------------------------------------------------------

FORGED = "2026-01-01 00:00:00,000 WARNING specgate: forged line"
HOSTILE_PATHS = [
    "/v1/%0a" + FORGED.replace(" ", "%20"),
    "/v1/models%0d%0aforged",
    "/v1/%1b%5b2J%1b%5b31mred",  # clear the screen, then red
    "/logs/%c2%9b31m",  # U+009B, the one-byte CSI of 8-bit terminals
    "/v1/%e2%80%a8line-separator",
    "/v1/%e2%80%aeright-to-left-override",
    "/v1/%00nul%7fdel",
]
RAW_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def raw_request(gateway: GatewayProcess, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_log_lines_escape_what_clients_send(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        for path in HOSTILE_PATHS:
            # httpx sends the path as written: the gateway decodes it, and logs the refusal.
            reply = client.post(path, json=chat("hi", MODEL))
            assert reply.status_code == 401, (path, reply.text)
    hostile_heads = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\x1b[31m\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: evil\x1b[2J.example\r\n",
        b"GET /v1/\x1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: id\x1b[31m\r\n",
    ]
    for head in hostile_heads:
        reply = raw_request(gateway, head + b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        assert reply.split(b" ")[1] in (b"400", b"401", b"415", b"421"), reply[:200]
    serves(gateway)
    log = gateway.log()
    assert "forged line" in log  # the refusals were logged: the checks below mean something
    assert not RAW_CONTROLS.search(log), RAW_CONTROLS.findall(log)
    assert not any(line.startswith(FORGED[:20]) for line in log.splitlines())
    assert "\\x0a" + FORGED in log or "\\\\x0a" + FORGED in log  # escaped, text or JSON
    if gateway.env["SPECGATE_LOG_FORMAT"] == "json":
        for line in log.splitlines():
            if line.strip() and not line.startswith("specgate: "):
                entry = json.loads(line)  # fails on a line that is not one JSON object
                assert not RAW_CONTROLS.search(entry["message"]), entry


# ----- a client that leaves while uploading ----------------------------------------------------------


def abort_upload(gateway: GatewayProcess, head: bytes, partial: bytes, reset: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    sock.sendall(head + partial)
    if reset:  # SO_LINGER 0: close with RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_leaves_mid_upload_is_client_gone(gateway: GatewayProcess) -> None:
    def head(path: str, length: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{length}\r\n\r\n"
        ).encode()

    body = body_text(SECRET).encode()
    uploads: list[tuple[bytes, bytes, bool]] = [
        (head("/v1/chat/completions", "Content-Length: 10000"), body[:30], False),
        (head("/v1/chat/completions", "Content-Length: 10000"), b"", False),
        (head("/v1/completions", "Content-Length: 10000"), body[:30], True),
        (head("/v1/chat/completions", "Transfer-Encoding: chunked"), b"10\r\n" + body[:16] + b"\r\n", False),
        (head("/v1/chat/completions", "Transfer-Encoding: chunked"), b"400\r\n" + body[:20], True),
    ]
    gone_before = outcome_total(gateway, "client_gone")
    internal_before = outcome_total(gateway, "internal_error")
    for upload in uploads:
        abort_upload(gateway, *upload)
    wait_for(
        lambda: outcome_total(gateway, "client_gone") == gone_before + len(uploads),
        20,
        "every aborted upload counted as client_gone",
    )
    assert outcome_total(gateway, "internal_error") == internal_before
    assert "Traceback" not in gateway.log()
    assert "ClientDisconnect" not in gateway.log()
    serves(gateway)
