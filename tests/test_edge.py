"""The edge (app/edge.py, app/browser_guard.py, app/http_limits.py): what every request passes first.

A real gateway on loopback in front of the fake backend (the backend does not matter here), talked to with
httpx and, where a client library would refuse to send the hostile input, raw sockets. After every hostile
request the gateway must still serve the next one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from app.browser_guard import HostPolicy
from app.logging_setup import JsonFormatter, RequestIdFilter
from app.profiles import ProfileSet
from app.server import create_app
from app.settings import Settings
from tests.harness import GatewayProcess, chat, fake_model_dir, fake_profile, free_port, running_gateway, wait_for

MODEL = "fake"
SLOW = "slow"  # half a second a token: its answers outlast the head and body timeouts
HEADER_TIMEOUT = 2.0  # SPECGATE_HEADER_TIMEOUT and _BODY_TIMEOUT for this gateway: short, so slow-upload tests end soon
HEADER_LIMIT = 64 * 1024  # the default SPECGATE_MAX_HEADER_BYTES


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("edge")
    model = fake_model_dir(workdir)
    profiles = fake_profile(MODEL, model, sampling="{ max_tokens = 4 }")
    profiles += fake_profile(SLOW, model, "--token-delay", "0.5", sampling="{ max_tokens = 10 }")
    env = {"SPECGATE_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "SPECGATE_BODY_TIMEOUT": str(HEADER_TIMEOUT)}
    with running_gateway(workdir, profiles, env) as running:
        yield running


def serves(gateway: GatewayProcess) -> None:
    """The gateway still answers a plain request, a completion included."""
    with gateway.client(timeout=30) as client:
        assert client.get("/health").status_code == 200
        reply = client.post("/v1/chat/completions", json=chat("still here", MODEL))
        assert reply.status_code == 200, reply.text


def assert_openai_error(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert reply.headers["x-request-id"]


# ----- Host names (DNS rebinding) -----------------------------------------------------------------


def test_host_names_of_the_loopback_bind_pass(gateway: GatewayProcess) -> None:
    port = gateway.port
    with gateway.client() as client:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "LOCALHOST.", f"[::1]:{port}", "127.0.0.2"):
            reply = client.get("/v1/models", headers={"host": host})
            assert reply.status_code == 200, (host, reply.text)


def test_foreign_host_names_get_421_on_every_route(gateway: GatewayProcess) -> None:
    """A DNS-rebinding page's requests carry its own name: none of them is answered, reads included."""
    port = gateway.port
    hosts = (
        "evil.example",
        f"evil.example:{port}",
        f"localhost.evil.example:{port}",
        f"127.0.0.1.nip.io:{port}",
        "attacker.localhost",
        "0.0.0.0",
        "192.168.1.10",
        "",
    )
    requests = (("GET", "/v1/models"), ("GET", "/status.json"), ("GET", f"/logs/{MODEL}"), ("GET", "/"))
    with gateway.client() as client:
        for host in hosts:
            for method, path in requests:
                reply = client.request(method, path, headers={"host": host})
                assert_openai_error(reply, 421, "host_not_allowed")
            post = client.post("/v1/chat/completions", json=chat("hi", MODEL), headers={"host": host})
            assert_openai_error(post, 421, "host_not_allowed")
    serves(gateway)


def test_two_host_headers_are_refused(gateway: GatewayProcess) -> None:
    for second in (b"evil.example", b"127.0.0.1"):
        head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: " + second + b"\r\nConnection: close\r\n\r\n"
        reply = raw_exchange(gateway, head)
        assert reply.startswith(b"HTTP/1.1 421"), reply[:200]
    serves(gateway)


def test_allowed_hosts_setting_adds_names(tmp_path: Path) -> None:
    profiles = fake_profile(MODEL, fake_model_dir(tmp_path))
    env = {"SPECGATE_ALLOWED_HOSTS": "gpu-box.lan, *.example.org"}
    with running_gateway(tmp_path, profiles, env) as gateway, gateway.client() as client:
        for host in ("gpu-box.lan", "gpu-box.lan:8000", "a.example.org", "b.a.example.org:80", "localhost"):
            assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
        for host in ("example.org.evil.example", "evil.example", "gpu-box.lan.evil.example", "xexample.org"):
            assert_openai_error(client.get("/v1/models", headers={"host": host}), 421, "host_not_allowed")


def test_host_policy_follows_the_bound_address() -> None:
    def allowed(policy: HostPolicy, names: list[str]) -> set[str]:
        return {name for name in names if policy.allows(name)}

    names = ["localhost", "127.0.0.1", "::1", "192.168.1.10", "10.1.2.3", "fe80::1", "evil.example"]
    assert allowed(HostPolicy("127.0.0.1"), names) == {"localhost", "127.0.0.1", "::1"}
    assert allowed(HostPolicy("192.168.1.10"), names) == {"localhost", "127.0.0.1", "::1", "192.168.1.10"}
    assert allowed(HostPolicy("0.0.0.0"), names) == set(names) - {"evil.example"}
    assert HostPolicy("0.0.0.0").allows(socket.gethostname().lower())
    assert allowed(HostPolicy("127.0.0.1", ["*"]), names) == set(names)


# ----- POST bodies must be JSON (cross-site "simple" requests) ------------------------------------


def test_post_bodies_must_say_application_json(gateway: GatewayProcess) -> None:
    """A page may POST text/plain or a form to any origin without asking; those used to run a completion."""
    body = json.dumps(chat("hi", MODEL)).encode()
    refused: list[str | None] = [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-16",
        "application/jsonp",
        "text/json",
        "",
    ]
    with gateway.client() as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/nowhere"):
            for content_type in refused:
                headers = {} if content_type is None else {"content-type": content_type}
                reply = client.post(path, content=body, headers=headers)
                assert_openai_error(reply, 415, "unsupported_media_type")
        for content_type in ("application/json", "application/json; charset=utf-8", 'Application/JSON;charset="UTF-8"'):
            reply = client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
            assert reply.status_code == 200, (content_type, reply.text)
    serves(gateway)


def test_the_openai_sdk_sends_what_the_edge_requires(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    stream = client.completions.create(model=MODEL, prompt="hi there", stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


# ----- request heads: size and time ---------------------------------------------------------------


def raw_exchange(gateway: GatewayProcess, request: bytes, timeout: float = 20.0) -> bytes:
    """Send `request` on a fresh connection; everything the gateway sends back until it closes or pauses."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes the connection (a reset counts as a close); a gateway that
    neither answers nor closes fails the test (the socket's timeout)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionError:  # a reset: we still had bytes unread by the gateway when it closed
        return data
    except TimeoutError:
        raise AssertionError(f"the gateway neither answered nor closed the connection (got {data[:200]!r})") from None


def send_in_pieces(gateway: GatewayProcess, head: bytes, filler: bytes, total: int) -> bytes:
    """Send `head`, then `filler` repeated up to `total` bytes in 64 KiB writes, then read the answer."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        with contextlib.suppress(OSError):  # the gateway may close while we still send: that is the point
            sock.sendall(head)
            sent = 0
            piece = filler * (65536 // len(filler))
            while sent < total:
                sock.sendall(piece)
                sent += len(piece)
        return read_reply(sock)


HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def test_request_heads_over_the_limit_get_431(gateway: GatewayProcess) -> None:
    cases = {
        # One header that never ends: cut off while it arrives.
        "one huge header": lambda: send_in_pieces(
            gateway, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", b"a", 1 << 20
        ),
        # Many small headers.
        "many headers": lambda: send_in_pieces(
            gateway, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n", 256 * 1024
        ),
        # A request line that never ends.
        "huge URL": lambda: send_in_pieces(gateway, b"GET /health?", b"x", 1 << 20),
        # A complete head just over the limit, in one write: measured exactly.
        "complete head": lambda: raw_exchange(
            gateway, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * HEADER_LIMIT + b"\r\n\r\n"
        ),
        # On a completion POST, with a body behind the head.
        "completion": lambda: raw_exchange(
            gateway,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"X-Pad: "
            + b"p" * (HEADER_LIMIT + 10)
            + b"\r\nContent-Length: 2\r\n\r\n{}",
        ),
    }
    for name, send in cases.items():
        reply = send()
        # The 431 is written before the close; a client still sending may see only the reset.
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), (name, reply[:200])
        if reply:
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_header_fields_too_large"
        serves(gateway)


def test_heads_under_the_limit_are_served(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        reply = client.get("/health", headers={"x-big": "a" * (HEADER_LIMIT - 2048)})
        assert reply.status_code == 200
        many = {f"x-h{i}": "v" * 20 for i in range(500)}
        reply = client.post("/v1/chat/completions", json=chat("hi", MODEL), headers=many)
        assert reply.status_code == 200, reply.text


def test_huge_headers_do_not_grow_memory(gateway: GatewayProcess) -> None:
    """Two connections sending 64 MiB headers at once (the issue measured 61 -> 664 MB with 256 MiB)."""
    assert gateway.process is not None
    pid = gateway.process.pid
    before = rss_mb(pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    senders = [threading.Thread(target=send_in_pieces, args=(gateway, head, b"a", 64 << 20)) for _ in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    stop.set()
    sampler.join()
    # Each connection may hold the limit plus one socket read; 32 MB leaves room for the allocator's noise.
    assert peak[0] - before < 32, (before, peak[0])
    serves(gateway)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_silent_connection_is_closed(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=HEADER_TIMEOUT * 10) as sock:
        assert sock.recv(100) == b""  # closed by the gateway (a timeout here raises instead)
    serves(gateway)


def trickle(sock: socket.socket, data: bytes, pause: float = 0.3) -> bytes:
    """Send `data` a byte at a time, `pause` apart, until the gateway answers or closes: what it sent, b""
    for a close (a reset included: our next byte after its close resets the connection, and the reset
    discards an answer not yet read)."""
    sock.settimeout(pause)
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                return sock.recv(4096)
    except ConnectionError:
        return b""
    raise AssertionError("every byte was taken: nothing cut the slow client off")


def test_a_head_that_trickles_in_gets_408(gateway: GatewayProcess) -> None:
    """Slowloris: a byte now and then keeps no connection past the header timeout."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        reply = trickle(sock, b"X-Slow: " + b"s" * 200)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
    serves(gateway)


def test_a_body_that_trickles_in_gets_408_and_counts_as_gone(gateway: GatewayProcess) -> None:
    """A body's bytes coming now and then keep its connection (and its buffered bytes) only so long."""
    body = json.dumps(chat("slow upload " + "word " * 100, MODEL)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    gone = outcome_total(gateway, "client_gone")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        reply = trickle(sock, body)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
    wait_for(lambda: outcome_total(gateway, "client_gone") == gone + 1, 10, "the slow upload counted as gone")
    serves(gateway)


def outcome_total(gateway: GatewayProcess, outcome: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    prefix = "specgate_requests_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and f'outcome="{outcome}"' in line
    )


def test_answers_may_outlast_the_head_and_body_timeouts(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        for stream in (False, True):
            reply = client.post("/v1/chat/completions", json=chat("take your time", SLOW, stream=stream))
            assert reply.status_code == 200, reply.text
            assert "t9" in reply.text  # all 10 tokens, about 5 s, more than twice each timeout


def test_keep_alive_connections_serve_request_after_request(gateway: GatewayProcess) -> None:
    """The header clock runs per request: a connection reused past the timeout still works."""
    with gateway.client() as client:
        deadline = time.monotonic() + HEADER_TIMEOUT * 2
        count = 0
        while time.monotonic() < deadline or count < 3:
            assert client.get("/health").status_code == 200
            count += 1
            time.sleep(HEADER_TIMEOUT / 4)


# ----- the request id on a 500 ---------------------------------------------------------------------


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, object]] = []
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@contextlib.contextmanager
def served_in_process(settings: Settings, app: object) -> Iterator[str]:
    """uvicorn with the gateway's own configuration, in a thread of this process, on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the in-process gateway")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_500_carries_the_request_id_and_its_log_line_too(tmp_path: Path) -> None:
    """Any route whose code raises (here one added for the test: the gateway has no known bug to trigger):
    an OpenAI-shaped 500 with X-Request-Id, and one log line with the traceback and the id."""
    settings = Settings(profiles_dir=tmp_path, model_store=tmp_path / "store")
    edge = create_app(settings, ProfileSet([]))

    async def broken() -> None:
        raise RuntimeError("a bug in a route")

    api = edge.app.app  # edge -> completion endpoint -> FastAPI
    assert isinstance(api, FastAPI)
    api.add_api_route("/broken", broken)
    captured = _Captured()
    logging.getLogger().addHandler(captured)
    try:
        with served_in_process(settings, edge) as url:
            for given in ("client-id-500", None):
                headers = {"x-request-id": given} if given else {}
                reply = httpx.get(f"{url}/broken", headers=headers, timeout=10)
                assert reply.status_code == 500
                assert reply.json()["error"] == {
                    "message": "internal error: RuntimeError",
                    "type": "internal_error",
                    "param": None,
                    "code": None,
                }
                request_id = reply.headers["x-request-id"]
                assert request_id == given if given else request_id.startswith("sg-")

                def logged(request_id: str = request_id) -> list[dict[str, object]]:
                    # starlette sends the 500 before it re-raises to the edge, which logs: wait for the line.
                    return [line for line in captured.lines if line["request_id"] == request_id]

                (line,) = wait_for(logged, 10, "the 500's log line")
                assert line["message"] == "unexpected error on GET /broken"
                assert "a bug in a route" in str(line["exception"])
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        logging.getLogger().removeHandler(captured)
