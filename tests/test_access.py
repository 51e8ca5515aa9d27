"""Access: loopback bind by default, optional API keys, CORS only when configured, nothing secret in logs.

A real gateway (`specgate serve`) in front of a real launcher on the tiny generated model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from tests.conftest import TinyPair
from tests.harness import PYTHON, ROOT, GatewayProcess, chat, running_gateway, wait_for

KEY = "sk-specgate-test-0123456789abcdef"
OTHER_KEY = "sk-second-key-from-the-file"
SECRET_PROMPT = "zebra-umbrella-47 is my secret prompt"


def base_profile(model: Path, name: str = "base") -> str:
    return f'[profiles."{name}"]\nmodel = "{model}"\nsampling = {{ temperature = 0.0 }}\n\n'


@pytest.fixture(scope="module")
def keyed(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("keyed")
    key_file = workdir / "keys.txt"
    key_file.write_text(f"# one key a line\n{OTHER_KEY}\n")
    env = {
        "SPECGATE_API_KEYS": KEY,
        "SPECGATE_API_KEY_FILE": str(key_file),
        "SPECGATE_AUTH_METRICS": "true",
        "SPECGATE_CORS_ORIGINS": "https://app.example",
    }
    gateway = GatewayProcess(workdir, base_profile(tiny_pair.main), env)
    # The harness's health probe carries no key: /health stays open here (auth_health is off).
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_default_bind_is_loopback() -> None:
    assert Settings().host == "127.0.0.1"


def test_v1_routes_need_a_valid_bearer_key(keyed: GatewayProcess) -> None:
    with keyed.client() as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
            reply = client.post("/v1/chat/completions", json=chat("hi", "base", max_tokens=2), headers=headers)
            assert reply.status_code == 401, (headers, reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/v1/models").status_code == 401
        assert client.get("/logs/base").status_code == 401
        # Both the env key and the file's key work.
        for key in (KEY, OTHER_KEY):
            reply = client.post(
                "/v1/chat/completions",
                json=chat(SECRET_PROMPT, "base", max_tokens=3),
                headers={"authorization": f"Bearer {key}"},
            )
            assert reply.status_code == 200, reply.text
        assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_metrics_and_health_follow_their_settings(keyed: GatewayProcess) -> None:
    with keyed.client() as client:
        assert client.get("/health").status_code == 200  # auth_health off
        assert client.get("/metrics").status_code == 401  # auth_metrics on
        with_key = client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})
        assert with_key.status_code == 200


def test_keys_and_prompt_text_never_reach_the_logs(keyed: GatewayProcess) -> None:
    with keyed.client() as client:
        reply = client.post(
            "/v1/chat/completions",
            json=chat(SECRET_PROMPT, "base", max_tokens=3),
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert reply.status_code == 200
        refused = client.post(
            "/v1/chat/completions", json=chat(SECRET_PROMPT, "base"), headers={"authorization": "Bearer sk-guess-xyz"}
        )
        assert refused.status_code == 401
    log = keyed.log()
    assert "success" in log  # the request was logged: the absence below means something
    for secret in (KEY, OTHER_KEY, "sk-guess-xyz", "zebra-umbrella-47"):
        assert secret not in log
    backend_logs = "".join(p.read_text(errors="replace") for p in keyed.workdir.rglob("*.log"))
    assert "zebra-umbrella-47" not in backend_logs


def test_cors_when_origins_are_configured(keyed: GatewayProcess) -> None:
    with keyed.client() as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        stranger = client.options(
            "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in stranger.headers
        simple = client.get("/v1/models", headers={"origin": "https://app.example", "authorization": f"Bearer {KEY}"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        # A browser reads a completion (streamed or not) only with the header on the answer itself.
        for stream in (False, True):
            completion = client.post(
                "/v1/chat/completions",
                json={**chat("hi", "base", max_tokens=2), "stream": stream},
                headers={"origin": "https://app.example", "authorization": f"Bearer {KEY}"},
            )
            assert completion.status_code == 200, completion.text
            assert completion.headers["access-control-allow-origin"] == "https://app.example"
            assert completion.headers["x-request-id"]
        # Refusals on the completion endpoint (the key check, bad input) carry them too, in the OpenAI shape.
        for headers, status in (({}, 401), ({"authorization": f"Bearer {KEY}"}, 400)):
            refused = client.post(
                "/v1/chat/completions", json={"model": "base"}, headers={"origin": "https://app.example", **headers}
            )
            assert refused.status_code == status, refused.text
            assert refused.headers["access-control-allow-origin"] == "https://app.example"
            assert refused.headers["x-request-id"]
            assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


def test_open_gateway_without_keys_and_no_cors_by_default(tiny_pair: TinyPair, tmp_path: Path) -> None:
    with running_gateway(tmp_path, base_profile(tiny_pair.main)) as gateway, gateway.client() as client:
        reply = client.get("/v1/models", headers={"origin": "https://app.example"})
        assert reply.status_code == 200
        assert not any(name.startswith("access-control-") for name in reply.headers)
        preflight = client.options(
            "/v1/chat/completions",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_missing_key_file_stops_start_up(tiny_pair: TinyPair, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, base_profile(tiny_pair.main), {"SPECGATE_API_KEY_FILE": str(tmp_path / "nope")})
    command = [
        PYTHON,
        "-m",
        "app.cli",
        "serve",
        "--port",
        str(gateway.port),
        "--profiles-dir",
        str(gateway.profiles_dir),
    ]
    result = subprocess.run(command, cwd=ROOT, env=gateway.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot read the API key file" in result.stderr


def test_opencode_config_works_against_a_keyed_gateway(keyed: GatewayProcess) -> None:
    """`specgate opencode-config --url` notices the keys (401), lists with SPECGATE_API_KEY, writes an env reference."""
    command = [PYTHON, "-m", "app.cli", "opencode-config", "--url", keyed.url]
    without = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=_env_without_key())
    assert without.returncode != 0
    assert "wants an API key" in without.stderr
    with_key = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env_without_key(), "SPECGATE_API_KEY": KEY},
    )
    assert with_key.returncode == 0, with_key.stderr
    provider = json.loads(with_key.stdout)["provider"]["specgate"]
    assert provider["options"]["apiKey"] == "{env:SPECGATE_API_KEY}"
    assert list(provider["models"]) == ["base"]
    assert KEY not in with_key.stdout


def _env_without_key() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SPECGATE_")}


def test_sighup_rotates_the_key_file(tiny_pair: TinyPair, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("sk-old\n")
    env = {"SPECGATE_API_KEY_FILE": str(key_file)}
    with running_gateway(tmp_path / "gw", base_profile(tiny_pair.main), env) as gateway, gateway.client() as client:

        def status(key: str) -> int:
            return client.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

        assert (status("sk-old"), status("sk-new")) == (200, 401)
        key_file.write_text("sk-new\n")
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: status("sk-new") == 200, 10, "the new key to be accepted")
        assert status("sk-old") == 401
        # A key file gone missing keeps the current keys (and says so) rather than opening the gateway.
        key_file.unlink()
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: "API keys not reloaded" in gateway.log(), 10, "the refusal in the log")
        assert (status("sk-new"), status("sk-old")) == (200, 401)
        assert "sk-new" not in gateway.log()
