"""A profile served by several nodes (issue 18 item 3): three real gateways, each in front of a real tiny mlx
backend, as the nodes of one `local = false` profile on a front gateway, all on loopback ports.

Every node has API keys on; the front reads them from a key file (two nodes) and the environment (the
third), so every served request also shows that keys reach their node. Answers are greedy and each prompt's
expected text differs from every other's, so an answer that belonged to another request would be seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.backends.node_keys import NodeKeyError, parse_keys_file
from app.profiles import ProfileError, parse_profiles
from tests.conftest import TinyPair
from tests.harness import GatewayProcess, free_port, read_sse, wait_for

PROFILE = "tiny"
MAX_TOKENS = 8
# Long enough (seconds on a CPU) to be mid-answer when its node is killed.
LONG_TOKENS = 1500
# Words of the tiny model's corpus (app/testing/tiny_model.py), so prompts tokenize to different tokens.
WORDS = ["def", "return", "import", "class", "self", "value", "print", "for", "while", "int", "None", "if",
         "else", "fibonacci", "sys", "os", "Example", "lambda", "yield", "pass"]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Profile fields and key files
# --------------------------------------------------------------------------------------------------


def _profile(body: str) -> str:
    return f'[profiles."remote"]\n{body}\n'


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ('local = false\nnodes = ["ftp://mac:8000"]', "nodes", "http:// or https://"),
        ('local = false\nnodes = ["http://mac:8000/v1"]', "nodes", "without /v1"),
        ('local = false\nnodes = ["http://mac:8000/api"]', "nodes", "no path"),
        ('local = false\nnodes = ["http://mac:8000", "HTTP://MAC:8000/"]', "nodes", "listed twice"),
        ('local = false\nnodes = ["http://user:secret@mac:8000"]', "nodes", "credentials"),
        ('local = false\nnodes = ["mac:8000"]', "nodes", "http:// or https://"),
        ('local = false\nnodes = [{ url = "http://mac:8000", api_key = "sk-1" }]', "nodes", "SPECGATE_NODE_KEYS_FILE"),
        ("local = false", "nodes", "at least one node"),
        ("local = false\nnodes = []", "nodes", "at least one node"),
        ('local = false\nnodes = "http://mac:8000"', "nodes", "a list"),
        ('nodes = ["http://mac:8000"]', "model", "required"),
        ('local = false\nnodes = ["http://mac:8000"]\napi_key = "sk-1"', "api_key", "SPECGATE_NODE_API_KEY"),
        ('local = false\nnodes = ["http://mac:8000"]\nsystem_prompt = "x"', "system_prompt", "nodes' own profile"),
        ('local = false\nnodes = ["http://mac:8000"]\ndraft_model = "x"', "draft_model", "nodes' own profile"),
    ],
)
def test_bad_node_fields_name_file_profile_and_field(body: str, field: str, words: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profiles(_profile(body), "nodes.toml")
    message = str(caught.value)
    assert message.startswith("nodes.toml: profile 'remote': "), message
    assert f"field {field!r}" in message, message
    assert words in message, message


def test_node_fields_are_normalized() -> None:
    (profile,) = parse_profiles(
        _profile('local = false\nnodes = ["http://Mac-Studio-2:8000/", "https://[::1]:9000", "http://10.0.0.2"]'),
        "nodes.toml",
    )
    assert profile.nodes == ("http://mac-studio-2:8000", "https://[::1]:9000", "http://10.0.0.2")
    assert not profile.local
    assert profile.model == ""
    (mixed,) = parse_profiles(_profile('model = "/m"\nnodes = ["http://a:1"]'), "nodes.toml")
    assert mixed.local
    assert mixed.nodes == ("http://a:1",)


def test_node_keys_file() -> None:
    keys = parse_keys_file("# node keys\nhttp://Mac:8000/  key-1\n\nhttps://b:9  key-2  # a comment\n", "keys.txt")
    assert keys == {"http://mac:8000": "key-1", "https://b:9": "key-2"}
    with pytest.raises(NodeKeyError, match=r"keys\.txt: line 1: expected `URL KEY`"):
        parse_keys_file("http://a:1\n", "keys.txt")
    with pytest.raises(NodeKeyError, match=r"line 2: .*without /v1"):
        parse_keys_file("http://a:1 k\nhttp://b:1/v1 k\n", "keys.txt")


# --------------------------------------------------------------------------------------------------
# Three real nodes behind a front gateway
# --------------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: list[GatewayProcess]
    front: GatewayProcess
    keys: list[str]
    expected: dict[str, str]  # prompt -> greedy text

    def node_of(self, url: str) -> GatewayProcess:
        return next(node for node in self.nodes if node.url == url)

    def node_figures(self, gateway: GatewayProcess | None = None) -> dict[str, dict[str, Any]]:
        """The front's (or `gateway`'s) figures per node of the profile, from its /status.json."""
        url = (gateway or self.front).url
        status = httpx.get(f"{url}/status.json?requests=0", timeout=5).json()
        (profile,) = [p for p in status["profiles"] if p["name"] == PROFILE]
        return {node["url"]: node for node in profile["nodes"]}

    def served(self, gateway: GatewayProcess | None = None) -> dict[str, int]:
        return {url: node["requests"].get("success", 0) for url, node in self.node_figures(gateway).items()}


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()


def _node_profile(model: Path) -> str:
    return f'[profiles."{PROFILE}"]\nmodel = "{model}"\nsampling = {{ temperature = 0.0 }}\n'


def _body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": PROFILE, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, **extra}


def _text(url: str, prompt: str, key: str | None = None, max_tokens: int = MAX_TOKENS) -> str:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/completions", json=_body(prompt, max_tokens=max_tokens), headers=auth, timeout=300)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def _stream(url: str, prompt: str, **extra: Any) -> tuple[str, list[dict[str, Any] | str]]:
    with httpx.stream("POST", f"{url}/v1/completions", json=_body(prompt, stream=True, **extra), timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [event for _, event in read_sse(r)]
    text = "".join(choice.get("text") or "" for e in events if isinstance(e, dict) for choice in e.get("choices") or ())
    return text, events


def _metric(front: GatewayProcess, name: str, **labels: str) -> float | None:
    body = httpx.get(f"{front.url}/metrics", timeout=5).text
    for line in body.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _stop(gateway: GatewayProcess) -> None:
    gateway.stop()
    if gateway.process is not None and gateway.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gateway.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("nodes")
    keys = [f"node-key-{index}" for index in range(3)]
    nodes = [
        GatewayProcess(
            root / f"node{index}",
            _node_profile(tiny_pair.main),
            {"SPECGATE_API_KEYS": keys[index], "SPECGATE_PRELOAD": json.dumps([PROFILE])},
        )
        for index in range(3)
    ]
    front_dir = root / "front"
    front_dir.mkdir()
    key_file = front_dir / "node-keys.txt"
    # Two keys from the file (one URL spelt differently), the third node's from the environment.
    key_file.write_text(f"# node keys\n{nodes[0].url}/ {keys[0]}\n{nodes[1].url.upper()} {keys[1]}\n")
    urls = ", ".join(f'"{node.url}"' for node in nodes)
    front = GatewayProcess(
        front_dir,
        f'[profiles."{PROFILE}"]\nlocal = false\nnodes = [{urls}]\n',
        {
            "SPECGATE_NODE_KEYS_FILE": str(key_file),
            "SPECGATE_NODE_API_KEY": keys[2],
            "SPECGATE_NODE_HEALTH_SECONDS": "0.3",
        },
    )
    started: list[GatewayProcess] = []
    try:
        # One at a time: three model loads at once would only slow each other on a small machine.
        for node in nodes:
            started.append(node.start(timeout=120))
        started.append(front.start())
        prompts = [" ".join(WORDS[i : i + 3]) for i in range(0, len(WORDS) - 2)]
        texts = {prompt: _text(nodes[0].url, prompt, keys[0]) for prompt in prompts}
        # Keep prompts whose answers differ from every other's: a mixed-up answer cannot pass for its own.
        counts: dict[str, int] = {}
        for text in texts.values():
            counts[text] = counts.get(text, 0) + 1
        expected = {prompt: text for prompt, text in texts.items() if counts[text] == 1 and text}
        assert len(expected) >= 8, f"too few distinct greedy answers: {texts}"
        cluster = Cluster(nodes, front, keys, expected)
        wait_for(lambda: all(n["up"] for n in cluster.node_figures().values()), 30, "every node up at the front")
        yield cluster
    finally:
        for gateway in reversed(started):
            _stop(gateway)


def test_requests_spread_over_nodes_with_their_own_answers(cluster: Cluster) -> None:
    before = cluster.served()
    prompts = list(cluster.expected) * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda p: _text(cluster.front.url, p), prompts))
    assert answers == [cluster.expected[p] for p in prompts]
    after = cluster.served()
    gained = {url: after[url] - before[url] for url in after}
    assert sum(gained.values()) == len(prompts)
    assert all(count >= 1 for count in gained.values()), gained
    figures = cluster.node_figures()
    assert all(node["kind"] == "specgate" and node["last_error"] is None for node in figures.values()), figures
    # Per-node figures in /metrics; the node's usage counted in the front's token totals.
    for url in after:
        assert _metric(cluster.front, "specgate_node_up", profile=PROFILE, node=url) == 1.0
        served = _metric(cluster.front, "specgate_node_requests_total", profile=PROFILE, node=url, outcome="success")
        assert served == after[url]
    assert (_metric(cluster.front, "specgate_generation_tokens_total", profile=PROFILE) or 0) >= len(prompts)


def test_a_session_stays_on_its_node(cluster: Cluster) -> None:
    """Turns of one conversation (the same start) go to the node that has its prompt cache, one after another;
    other conversations still spread."""
    prompt = list(cluster.expected)[1]
    before = cluster.served()
    for _ in range(4):
        assert _text(cluster.front.url, prompt) == cluster.expected[prompt]
    after = cluster.served()
    assert sorted(after[url] - before[url] for url in after) == [0, 0, 4]


def test_streaming_is_relayed_as_the_node_sent_it(cluster: Cluster) -> None:
    prompt = next(iter(cluster.expected))
    tokens_before = _metric(cluster.front, "specgate_generation_tokens_total", profile=PROFILE) or 0
    text, events = _stream(cluster.front.url, prompt)
    assert text == cluster.expected[prompt]
    assert events[-1] == "[DONE]"
    # The client did not ask for usage: the node's usage chunk (asked for the front's figures) is not shown.
    assert not any(isinstance(e, dict) and "usage" in e and not e.get("choices") for e in events)
    text, events = _stream(cluster.front.url, prompt, stream_options={"include_usage": True})
    assert text == cluster.expected[prompt]
    (usage,) = [e for e in events if isinstance(e, dict) and "usage" in e and not e.get("choices")]
    assert usage["usage"]["completion_tokens"] >= 1
    assert "timings" in usage  # the node's own rewrite, relayed as it was
    tokens_after = _metric(cluster.front, "specgate_generation_tokens_total", profile=PROFILE) or 0
    assert tokens_after - tokens_before == 2 * usage["usage"]["completion_tokens"]


def test_request_id_reaches_the_node(cluster: Cluster) -> None:
    request_id = f"client-{time.monotonic_ns()}"
    prompt = next(iter(cluster.expected))
    response = httpx.post(
        f"{cluster.front.url}/v1/completions", json=_body(prompt), headers={"X-Request-Id": request_id}, timeout=120
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    front = httpx.get(f"{cluster.front.url}/status.json?requests=50", timeout=5).json()
    served_by = [r for r in front["requests"] if r["request_id"] == request_id]
    assert len(served_by) == 1
    assert served_by[0]["outcome"] == "success"
    # The node that served it (the front's log line names it) has a record under the same id, and logged it.
    line = wait_for(
        lambda: next((ln for ln in cluster.front.log().splitlines() if request_id in ln and "node=" in ln), None),
        10,
        "the front's log line",
    )
    node = cluster.node_of(line.split("node=")[1].split(",")[0].strip())
    records = httpx.get(f"{node.url}/status.json?requests=50", timeout=5).json()["requests"]
    assert [r["outcome"] for r in records if r["request_id"] == request_id] == ["success"]
    assert request_id in node.log()


def test_a_front_without_the_keys_is_refused_by_the_nodes(cluster: Cluster, tmp_path: Path) -> None:
    urls = ", ".join(f'"{node.url}"' for node in cluster.nodes)
    bare = GatewayProcess(tmp_path, f'[profiles."{PROFILE}"]\nlocal = false\nnodes = [{urls}]\n').start()
    try:
        response = httpx.post(f"{bare.url}/v1/completions", json=_body(next(iter(cluster.expected))), timeout=60)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"]
    finally:
        _stop(bare)


def test_no_node_to_take_the_request(tmp_path: Path) -> None:
    """Nothing listens at the only node: it shows down, and a request gets 503 (a stream: its error event)."""
    dead = f"http://127.0.0.1:{free_port()}"
    front = GatewayProcess(tmp_path, f'[profiles."{PROFILE}"]\nlocal = false\nnodes = ["{dead}"]\n').start()
    try:
        response = httpx.post(f"{front.url}/v1/completions", json=_body("def"), timeout=60)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "no_node_available"
        _, events = _stream(front.url, "def")
        assert events[-1] == {"error": {"message": ANY_TEXT, "type": "upstream_error", "param": None,
                                        "code": "no_node_available"}}  # fmt: skip
        models = front.models()[PROFILE]
        assert models["state"] == "down"
        assert models["nodes"][0]["up"] is False
        assert _metric(front, "specgate_requests_total", profile=PROFILE, outcome="backend_error") == 2.0
    finally:
        _stop(front)


def test_a_local_backend_and_nodes_share_a_profile(cluster: Cluster, tiny_pair: TinyPair, tmp_path: Path) -> None:
    """`local = true` with nodes: a request stays local while the local backend is free; with the local
    backend busy (a long request on it), the next ones go to the nodes, whose queues are shorter."""
    urls = ", ".join(f'"{node.url}"' for node in cluster.nodes)
    env = {"SPECGATE_NODE_API_KEY": "unused", "SPECGATE_PRELOAD": json.dumps([PROFILE])}
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{node.url} {key}\n" for node, key in zip(cluster.nodes, cluster.keys, strict=True)))
    env["SPECGATE_NODE_KEYS_FILE"] = str(keys)
    mixed = GatewayProcess(tmp_path, _node_profile(tiny_pair.main) + f"nodes = [{urls}]\n", env).start(timeout=120)
    try:
        prompt = next(iter(cluster.expected))
        assert _text(mixed.url, prompt) == cluster.expected[prompt]
        before = cluster.served(mixed)
        with ThreadPoolExecutor(max_workers=4) as pool:
            long = pool.submit(_text, mixed.url, prompt, max_tokens=LONG_TOKENS)
            wait_for(lambda: mixed.models()[PROFILE]["backend"]["running"] == 1, 30, "the long request running locally")
            shorts = list(cluster.expected)[:3]
            answers = list(pool.map(lambda p: _text(mixed.url, p), shorts))
            assert not long.done()
            long.result(timeout=300)
        assert answers == [cluster.expected[p] for p in shorts]
        after = cluster.served(mixed)
        # The first request and the long one stayed local; the three short ones went to nodes.
        assert sum(after[url] - before[url] for url in after) == len(shorts)
        status = httpx.get(f"{mixed.url}/status.json?requests=10", timeout=5).json()
        assert sum(1 for r in status["requests"] if r["outcome"] == "success") == 5
    finally:
        _stop(mixed)


def test_a_node_killed_under_load_loses_no_request(cluster: Cluster) -> None:
    """SIGKILL one node (its gateway and backend) while requests run on every node, a long one on the victim
    among them: every client still gets its own full answer (the victim's requests, which nothing had reached
    the client of, are sent again to a survivor), the survivors serve the rest, the dead node shows down, and
    serves again once restarted."""
    victim = cluster.nodes[1]
    prompts = list(cluster.expected)
    # Conversations no earlier request started: one the front had sent to a node would stick to that node
    # (session affinity allows one request more there than on the least loaded), and two of the long requests
    # could then share a node and leave another without one.
    long_prompts = [f"{prompt} once more" for prompt in prompts[-3:]]
    with ThreadPoolExecutor(max_workers=3) as pool:
        long_expected = list(
            pool.map(
                lambda i: _text(cluster.nodes[i].url, long_prompts[i], cluster.keys[i], max_tokens=LONG_TOKENS),
                range(3),
            )
        )
    # Quiet nodes (their reported queues too), so the three long requests go one to each node.
    wait_for(
        lambda: all(n["queue"] == 0 and n["in_flight"] == 0 for n in cluster.node_figures().values()),
        30,
        "quiet nodes",
    )
    retried_before = cluster.node_figures()[victim.url]["retried"]
    killed = threading.Event()
    stop = threading.Event()
    failures: list[str] = []
    answered: list[str] = []

    def client(worker: int) -> None:
        index = worker
        while not stop.is_set():
            prompt = prompts[index % len(prompts)]
            # Streams only once the victim is dead: a stream cut mid-answer cannot be sent again.
            streamed = killed.is_set() and index % 2 == 0
            index += 1
            try:
                if streamed:
                    text, events = _stream(cluster.front.url, prompt)
                    if events[-1] != "[DONE]":
                        failures.append(f"stream {prompt!r}: cut: {text!r} {events[-2:]}")
                        continue
                else:
                    text = _text(cluster.front.url, prompt)
            except AssertionError as error:
                failures.append(f"{prompt!r}: {error}")
                continue
            if text != cluster.expected[prompt]:
                failures.append(f"{prompt!r}: got {text!r}, expected {cluster.expected[prompt]!r}")
            answered.append(prompt)

    served_before = cluster.served()
    long_pool = ThreadPoolExecutor(max_workers=3)
    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(4)]
    try:
        longs = [long_pool.submit(_text, cluster.front.url, p, max_tokens=LONG_TOKENS) for p in long_prompts]
        wait_for(
            lambda: all(n["in_flight"] >= 1 for n in cluster.node_figures().values()), 120, "a long request per node"
        )
        for thread in threads:
            thread.start()
        # Short requests queue behind the long ones at every node (a backend takes one at a time).
        wait_for(
            lambda: sum(n["in_flight"] for n in cluster.node_figures().values()) >= 5, 30, "short requests in flight"
        )
        assert not any(future.done() for future in longs), "the long requests ended before the kill"
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        killed.set()
        wait_for(lambda: cluster.node_figures()[victim.url]["up"] is False, 20, "the front to mark the node down")
        assert _metric(cluster.front, "specgate_node_up", profile=PROFILE, node=victim.url) == 0.0
        # Its requests in flight at the kill have ended (sent again elsewhere); none is sent to it now.
        wait_for(lambda: cluster.node_figures()[victim.url]["in_flight"] == 0, 60, "the victim's requests to end")
        served_down = cluster.served()
        count = len(answered)
        wait_for(lambda: len(answered) >= count + 8, 120, "survivors to answer more requests")
        assert [future.result(timeout=300) for future in longs] == long_expected
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:  # started (a failed wait above leaves them unstarted)
                thread.join(timeout=300)
        long_pool.shutdown(wait=True, cancel_futures=True)
    assert not failures, failures
    after = cluster.served()
    assert after[victim.url] == served_down[victim.url]  # nothing more went to the dead node
    survivors = [node.url for node in cluster.nodes if node is not victim]
    assert sum(after[url] - served_down[url] for url in survivors) >= 8
    assert sum(after[url] - served_before[url] for url in after) == len(answered) + 3
    # The victim's long request at least was sent again; its requests failed none (all were retried).
    victim_figures = cluster.node_figures()[victim.url]
    assert victim_figures["retried"] > retried_before
    assert set(victim_figures["requests"]) <= {"success"}, victim_figures
    assert (_metric(cluster.front, "specgate_node_retried_total", profile=PROFILE, node=victim.url) or 0) >= 1
    assert (_metric(cluster.front, "specgate_requests_total", profile=PROFILE, outcome="backend_error") or 0) == 0
    page = httpx.get(f"{cluster.front.url}/", timeout=5).text
    assert 'id="nodes"' in page

    # Back: the same address answers its health check again, and takes requests again.
    victim.start(timeout=120)
    wait_for(lambda: cluster.node_figures()[victim.url]["up"] is True, 20, "the front to see the node back")
    assert _metric(cluster.front, "specgate_node_up", profile=PROFILE, node=victim.url) == 1.0
    # New conversations (no node of their own yet), so round-robin among the idle nodes reaches the victim.
    fresh = [f"{prompt} pass" for prompt in prompts[:6]]
    fresh_expected = [_text(victim.url, prompt, cluster.keys[1]) for prompt in fresh]
    assert [_text(cluster.front.url, prompt) for prompt in fresh] == fresh_expected
    assert cluster.served()[victim.url] > served_down[victim.url]
