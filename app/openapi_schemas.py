"""OpenAPI request bodies for the completion routes.

The handlers read the raw body themselves (their own precise errors, unknown fields passed through
untouched), so FastAPI cannot infer a schema from them. These describe what is accepted, for clients,
code generators and the schemathesis fuzz test; `additionalProperties` stays open on purpose.
"""

from __future__ import annotations

from typing import Any

_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": "integer", "minimum": 1, "description": "clamped to the profile's max_output_tokens"},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "num_draft_tokens": {"type": "integer", "minimum": 0, "maximum": 64, "description": "specgate: draft length k"},
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
        "name": {"type": "string"},
    },
}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "required": required, "properties": properties, "additionalProperties": True}
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
