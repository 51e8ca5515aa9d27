"""OpenAPI request bodies for the completion routes.

The handlers read the raw body themselves (their own precise errors, unknown fields passed through
untouched), so FastAPI cannot infer a schema from them. These describe what is accepted, for clients,
code generators and the schemathesis fuzz test; `additionalProperties` stays open on purpose.
"""

from __future__ import annotations

from typing import Any

from app.proxy.backend_fields import (
    LOGIT_BIAS_RANGE,
    MAX_DEPTH,
    MAX_LOGIT_BIAS,
    MAX_STOP,
    MAX_STOP_CHARS,
    NUMBER_RANGES,
    TEMPLATE_KWARGS,
)
from app.proxy.rewrite import MAX_DRAFT_TOKENS, MAX_TOP_LOGPROBS

_STOP_WORD = {"type": "string", "maxLength": MAX_STOP_CHARS}
_CONTEXT_SIZE = {"type": "integer", "minimum": 0, "description": "at most the profile's context"}
_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": "integer", "minimum": 1, "description": "clamped to the profile's max_output_tokens"},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    **{name: {"type": "number", "minimum": low, "maximum": high} for name, (low, high) in NUMBER_RANGES.items()},
    "top_k": {"type": "integer", "minimum": 0},
    "repetition_context_size": _CONTEXT_SIZE,
    "presence_context_size": _CONTEXT_SIZE,
    "frequency_context_size": _CONTEXT_SIZE,
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "logit_bias": {
        "type": "object",
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "number", "minimum": LOGIT_BIAS_RANGE[0], "maximum": LOGIT_BIAS_RANGE[1]},
        "description": "token ids (below the model's vocabulary size) to biases",
    },
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    "stop": {"oneOf": [_STOP_WORD, {"type": "array", "maxItems": MAX_STOP, "items": _STOP_WORD}]},
    "chat_template_kwargs": {
        "type": "object",
        "properties": {key: {"type": kind} for key, kind in TEMPLATE_KWARGS.items()},
        "additionalProperties": False,
    },
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "num_draft_tokens": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_DRAFT_TOKENS,
        "description": "specgate: draft length k",
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
}

_IMAGE_PART = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"type": "string", "enum": ["image_url"]},
        "image_url": {
            "type": "object",
            "required": ["url"],
            "properties": {"url": {"type": "string", "pattern": "^data:", "description": "data: URLs only"}},
        },
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [_TEXT_PART, _IMAGE_PART]}}]},
        "name": {"type": "string"},
    },
}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": True,
        "description": f"objects and arrays nest at most {MAX_DEPTH} levels (the body counting 1)",
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CHAT_COMPLETION = _body(
    {
        "model": {"type": "string", "description": "a profile name or alias"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_SAMPLING,
    },
    ["model", "messages"],
)
TEXT_COMPLETION = _body(
    {"model": {"type": "string"}, "prompt": {"type": "string"}, "echo": {"type": "boolean"}, **_SAMPLING},
    ["model", "prompt"],
)
