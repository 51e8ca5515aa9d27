"""Verification attention without mlx's per-shape cuDNN build (app/launcher/verify_attention.py).

The point of the module is speed on CUDA (measured with `specgate bench` on a GPU, docs/benchmarks.md);
what runs here is what must hold everywhere: the plain-ops attention computes what the fused kernel
computes, only verification-shaped calls are routed to it, `auto` changes nothing off CUDA, and a
launcher forced onto the plain path still returns plain greedy decoding token for token.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from app.launcher import verify_attention
from app.launcher.options import parse_args
from app.launcher.verify_attention import install, resolve_mode, routed_sdpa, unfused_attention
from tests.conftest import LauncherFactory, TinyPair
from tests.test_launcher import Reference, body_for, complete
from tests.test_prompt_lookup import CHAT_PROMPT, TEXT_PROMPTS, _expected, figures

FUSED = mx.fast.scaled_dot_product_attention


def _qkv(query_heads: int, kv_heads: int, query_len: int, key_len: int) -> tuple[mx.array, mx.array, mx.array]:
    mx.random.seed(query_heads * 1000 + query_len * 10 + key_len)
    return (
        mx.random.normal((1, query_heads, query_len, 32)),
        mx.random.normal((1, kv_heads, key_len, 32)),
        mx.random.normal((1, kv_heads, key_len, 32)),
    )


@pytest.mark.parametrize("heads", [(12, 2), (4, 4)])
@pytest.mark.parametrize("query_len", [2, 5, 9])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_plain_ops_attention_equals_the_fused_kernel(heads: tuple[int, int], query_len: int, mask: str | None) -> None:
    q, k, v = _qkv(*heads, query_len, 40)
    expected = FUSED(q, k, v, scale=0.17, mask=mask)
    actual = unfused_attention(q, k, v, 0.17, causal=mask == "causal")
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-5, atol=1e-6)


def test_causal_rows_see_only_keys_up_to_their_position() -> None:
    q, k, v = _qkv(2, 2, 3, 10)
    full = unfused_attention(q, k, v, 0.2, causal=True)
    # Row i sits at position 10 - 3 + i: it must equal attention over exactly the first 8 + i keys.
    for i in range(3):
        row = unfused_attention(q[:, :, i : i + 1], k[:, :, : 8 + i], v[:, :, : 8 + i], 0.2, causal=False)
        np.testing.assert_allclose(np.array(full[:, :, i : i + 1]), np.array(row), rtol=1e-5, atol=1e-6)


def test_only_verification_shaped_calls_leave_the_fused_kernel() -> None:
    calls: list[tuple[int, int]] = []

    def counted(queries: mx.array, keys: mx.array, values: mx.array, **kwargs: Any) -> mx.array:
        calls.append((queries.shape[2], keys.shape[2]))
        return FUSED(queries, keys, values, **kwargs)

    sdpa = routed_sdpa(counted)
    cases: list[tuple[int, int, Any]] = [
        (1, 40, None),  # a decode step: the vector kernel
        (5, 40, "causal"),  # a verification round: plain ops
        (33, 40, "causal"),  # more rows than a round: the fused kernel
        (16, 16, "causal"),  # a whole prompt's prefill: the fused (flash) kernel
        (5, 40, mx.zeros((5, 40))),  # an array mask: left to the fused kernel
    ]
    for query_len, key_len, mask in cases:
        q, k, v = _qkv(4, 2, query_len, key_len)
        np.testing.assert_allclose(
            np.array(sdpa(q, k, v, scale=0.1, mask=mask)),
            np.array(FUSED(q, k, v, scale=0.1, mask=mask)),
            rtol=1e-5,
            atol=1e-6,
        )
    assert calls == [(1, 40), (33, 40), (16, 16), (5, 40)]


def test_modes_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(verify_attention.ENV, raising=False)
    options, rest = parse_args(["--verify-attention", "fused", "--model", "m"])
    assert (options.verify_attention, rest) == ("fused", ["--model", "m"])
    assert parse_args([])[0].verify_attention == "auto"
    assert resolve_mode("auto") == "auto"
    monkeypatch.setenv(verify_attention.ENV, "fused")
    assert resolve_mode("unfused") == "fused"  # the environment is the kill switch
    monkeypatch.setenv(verify_attention.ENV, "sometimes")
    with pytest.raises(ValueError, match="SPECGATE_VERIFY_ATTENTION"):
        resolve_mode("auto")


def test_auto_and_fused_change_nothing_off_cuda() -> None:
    assert not verify_attention.on_cuda()  # CI and this machine run mlx on the CPU
    assert install("auto") is False
    assert install("fused") is False
    assert mx.fast.scaled_dot_product_attention is FUSED


@pytest.mark.parametrize("endpoint", ["text", "chat"])
def test_launcher_on_plain_ops_attention_keeps_greedy_output_and_figures(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, endpoint: str
) -> None:
    """Prompt lookup with verification rounds on the plain-ops path: the tokens of plain greedy decoding."""
    backend = launcher_factory.ready(
        "--model",
        str(tiny_pair.main),
        "--prompt-lookup",
        "--lookup-min-ngram",
        "1",
        "--lookup-max-ngram",
        "3",
        "--verify-attention",
        "unfused",
    )
    assert "verification attention unfused" in backend.stderr()
    reference = Reference(tiny_pair)
    prompts: list[Any] = TEXT_PROMPTS if endpoint == "text" else [CHAT_PROMPT]
    for prompt in prompts:
        tokens, expected = _expected(reference, endpoint, prompt, 24, 4)
        for _ in range(2):  # the second from the prompt cache: a short tail over a longer key sequence
            result = complete(backend, endpoint, body_for(endpoint, prompt, 24, 4), stream=False)
            assert result.text == expected["text"]
            if result.token_ids is not None:
                assert result.token_ids == tokens
            assert figures(result.specgate) == {name: expected[name] for name in figures(expected)}


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_round_cost_command_times_every_size(tiny_pair: TinyPair, mode: str) -> None:
    """`python -m app.bench.roundcost` (the per-pass timing behind docs/benchmarks.md's H100 diagnosis)."""
    import re
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "app.bench.roundcost", str(tiny_pair.main), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    line = rf"^{mode} q=(\d+): growing keys [\d.]+ ms \(max [\d.]+\), repeated shape [\d.]+ ms$"
    rows = re.findall(line, done.stdout, re.M)
    assert rows == ["1", "3", "5", "9"], done.stdout
