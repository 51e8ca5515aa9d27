"""Start an answer with given text: the opening of a forced tool call.

For `tool_choice: "required"` or a named function the gateway sends the call's opening in the body's
`specgate_prefill` (e.g. `{"name": "read", "arguments": `), and parses that prefix plus the generated
text (app/proxy/toolrelay.py). Its tokens are appended to the prompt after the chat template's
generation prompt, so the model continues the call instead of deciding whether to make one.

It is applied in `_tokenize`, which both generation paths (the batch generator, and `stream_generate`
with a draft) and the prompt cache lookup use: a speculative backend and its baseline see the same
prompt, and greedy equality between them holds as for any other prompt.
"""

from __future__ import annotations

from typing import Any

BODY_FIELD = "specgate_prefill"
_ATTRIBUTE = "specgate_prefill"


def attach_prefill(request: Any, body: Any) -> None:
    """Carry the body's prefill, if any, on the request object to the generation thread."""
    text = body.get(BODY_FIELD) if isinstance(body, dict) else None
    if isinstance(text, str) and text and getattr(request, "request_type", "chat") == "chat":
        setattr(request, _ATTRIBUTE, text)


def with_prefill(tokenized: Any, tokenizer: Any, request: Any) -> Any:
    """`_tokenize`'s result with the prefill's tokens at the end of the prompt and of its last segment."""
    text = getattr(request, _ATTRIBUTE, None)
    if not text:
        return tokenized
    prompt, segments, segment_types, initial_state, vision = tokenized
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    # The segments partition the prompt (mlx caches at their ends): the prefill joins the last one.
    segments = [*segments[:-1], [*segments[-1], *tokens]]
    return [*prompt, *tokens], segments, segment_types, initial_state, vision
