"""`specgate serve` prepares the catalog:/gguf: models its profiles need before it takes traffic."""

from __future__ import annotations

from pathlib import Path

from app.models.sources import describe_source
from app.prepare import prepare_models, sources_to_prepare
from app.profiles import ProfileSet, parse_profiles
from tests.harness import chat, running_gateway
from tests.models_helpers import write_tiny_gguf


def _profiles(text: str) -> ProfileSet:
    return ProfileSet(parse_profiles(text))


def test_only_missing_preparable_sources_are_prepared(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf").path
    profiles = _profiles(
        f'[profiles.a]\nmodel = "gguf:{gguf}"\n'
        f'[profiles.b]\nmodel = "gguf:{gguf}"\ndraft_model = "catalog:no-such-model"\n'
        f'[profiles.c]\nmodel = "{tmp_path / "missing-dir"}"\n'
    )
    store = tmp_path / "store"
    assert sources_to_prepare(profiles, store) == [f"gguf:{gguf}", "catalog:no-such-model"]
    messages: list[str] = []
    failures = prepare_models(profiles, store, messages.append)
    # The unknown catalog entry fails alone; the GGUF is imported and now present.
    assert list(failures) == ["catalog:no-such-model"]
    assert "unknown catalog model" in failures["catalog:no-such-model"]
    assert describe_source(f"gguf:{gguf}", store).present
    assert any("ready: gguf:" in message for message in messages)
    assert sources_to_prepare(profiles, store) == ["catalog:no-such-model"]


def test_serve_imports_a_gguf_profile_then_answers(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf").path
    profiles = f'[profiles."from-gguf"]\nmodel = "gguf:{gguf}"\n'
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        assert "preparing model 1/1" in gateway.log()
        assert gateway.models()["from-gguf"]["state"] != "not_present"
        reply = client.post("/v1/chat/completions", json=chat("hello", "from-gguf", max_tokens=4))
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
