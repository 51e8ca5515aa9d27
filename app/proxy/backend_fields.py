"""The request fields mlx_lm.server reads, checked before they reach it (issue 19).

mlx_lm.server 0.32.2 (`APIHandler.do_POST`, `validate_model_parameters`) checks the types of most fields
and a few ranges, but not what breaks it where the values are used, and one request's value there breaks
the backend for every request it holds, not only the one that sent it:

- `logit_bias` ids index the logits unchecked: far past the vocabulary the process dies (SIGSEGV), just
  past it the write lands in other memory. Values that are not numbers (`null`, a list) make its
  `float(v)` raise a TypeError its check does not catch: the handler thread dies without an answer.
- `repetition_context_size` (and the presence/frequency variants) slice the token history with mlx;
  2**40 overflows the slice and the generation thread dies.
- `xtc_threshold` over 0.5 raises inside the sampler, in the generation thread.
- `chat_template_kwargs` go to transformers' `apply_chat_template` as keyword arguments: `return_tensors`
  or `truncation` with `max_length` kill the generation thread, `padding` turns a word into a prompt of
  any length past the context check, and any other key becomes a template variable.
- Image parts (`image_url`, `input_image`, `image`; a URL string or `{"url": ...}`) with an `http(s)` URL
  are fetched by the backend before anything else, and the fetch error came back to the caller: request
  forgery and a port scanner. The backend only ever reads a part's `type`, `text`, `image_url`, `image`.
- `stop`: each distinct list is compiled into a matcher and cached (up to 100 lists); 300k strings cost
  the backend ~290 MB for good.
- And values the gateway's own JSON encoding cannot carry: past 254 levels of nesting orjson refuses the
  body and the stdlib encoder takes over, deeper in the stack than the parser ran, so that 975-977 levels
  parsed and then ran out of recursion (a 500); `1e400` parses as infinity, which orjson sends as null
  (`logit_bias` values so became null in the backend: a 502 counted as a backend error).

So each field it reads is checked here against what it can take: OpenAI's documented type and range
where OpenAI has the field, mlx_lm's own limits where they are narrower, the model's vocabulary and
context where a value indexes them (`check_model_bounds`). A refusal is a 400 with `param` naming the
field. Messages quote no free text of the request, only numbers and the names of fields and part types,
shortened: error records are shown on the open status page.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import InvalidRequest
from app.profiles import Profile
from app.proxy.context import model_sizes

# Objects and arrays inside one another, the body itself counting 1. OpenAI requests nest a handful of
# levels (tool schemas a few more); the JSON encoders give up much deeper (orjson at 255, the stdlib's
# recursion near 1000, counted from wherever the stack already is), which was a 500.
MAX_DEPTH = 64
# (low, high) for numbers: OpenAI's ranges; repetition_penalty and xtc_* are mlx_lm's (OpenAI has neither).
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, 100.0),
    "xtc_probability": (0.0, 1.0),
    # mlx_lm's sampler raises above 0.5, in the generation thread.
    "xtc_threshold": (0.0, 0.5),
}
# mlx_lm.server's check refuses an integer here ("must be of type float"): sent as the same float.
FLOAT_ONLY = ("xtc_probability", "xtc_threshold")
# Token counts into the history; bounded by the model's context in check_model_bounds.
CONTEXT_SIZES = ("repetition_context_size", "presence_context_size", "frequency_context_size")
# Where neither the profile nor the model's config.json says the context: far below mlx's int32 slices.
FALLBACK_CONTEXT = 1 << 20
_INFINITIES = (math.inf, -math.inf)  # NaN cannot parse: the body's NaN literal is refused as such
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
LOGIT_BIAS_RANGE = (-100.0, 100.0)
_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: int() also reads " 7", "+7", "1_0" and "٣"
# More than OpenAI's 4: code-completion clients send longer lists. Bounded so that what the backend
# compiles and caches per distinct list stays small.
MAX_STOP = 16
MAX_STOP_CHARS = 256
# Template variables a request may set. The served models' templates (Qwen2.5, SmolLM2) read none;
# Qwen3-style templates read enable_thinking, which clients send. Anything else is a keyword argument of
# apply_chat_template (return_tensors, truncation, padding, tokenize, chat_template, ...) or an unknown.
TEMPLATE_KWARGS: dict[str, str] = {"enable_thinking": "boolean"}  # key -> JSON type
# Fields mlx_lm.server reads with a default (`body.get(name, default)`) but whose check refuses null:
# null means "not sent", as in OpenAI's API, so it is dropped and the default applies.
DEFAULTED = (
    *NUMBER_RANGES,
    *CONTEXT_SIZES,
    "top_k",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "stop",
    "chat_template_kwargs",
    "role_mapping",
)
TEXT_PARTS = ("text",)
IMAGE_PARTS = ("image_url",)


def _fail(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _shown(value: Any) -> str:
    """A number for a message, shortened: a 4000-digit integer is a valid JSON number."""
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _field_name(key: str) -> str:
    """A top-level key for a message and `param`: any string is a valid key, so shortened."""
    return key if len(key) <= 40 else key[:37] + "..."


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "number")


def _described(value: Any) -> str:
    return _shown(value) if _is_number(value) else f"a JSON {_json_type(value)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_values(body: dict[str, Any]) -> None:
    """Nesting depth and numbers: what the gateway's JSON encoders and the backend can carry.

    A float literal too large for a double (1e400) parses as infinity, which orjson writes as null and
    the stdlib as `Infinity` (not JSON): a value the client never sent. Walked level by level, without
    recursion, looking only at types: every request goes through here. Measured on the project's 2-core
    machine: 0.19 ms for a 75 KB body of 40 messages and 20 tools (json.loads: 0.5 ms), 2 us for a small one.
    """
    for key, value in body.items():
        if type(value) is float:
            _refuse_infinite(value, key)
        elif type(value) is dict or type(value) is list:
            _check_nested(value, key)


def _refuse_infinite(value: float, key: str) -> None:
    if value in _INFINITIES:
        field = _field_name(key)
        raise _fail(f"a number in '{field}' is out of range (it overflows a 64-bit float)", field)


def _check_nested(value: dict[str, Any] | list[Any], key: str) -> None:
    level: list[Any] = [value]
    depth = 2  # the body is 1
    while level:
        if depth > MAX_DEPTH:
            field = _field_name(key)
            raise _fail(f"'{field}' is nested too deeply (more than {MAX_DEPTH} levels in the body)", field)
        below = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                kind = type(item)
                if kind is dict or kind is list:
                    below.append(item)
                elif kind is float:
                    _refuse_infinite(item, key)
        level = below
        depth += 1


def _check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise _fail(f"'{name}' must be a number, got a JSON {_json_type(value)}", name)
    if not low <= value <= high:
        raise _fail(f"'{name}' must be between {low:g} and {high:g}, got {_shown(value)}", name)


def _check_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"'{name}' must be an integer, got {_described(value)}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(f"'{name}' must be {bound}, got {_shown(value)}", name)


def _check_logit_bias(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise _fail(f"'logit_bias' has {len(value)} entries; at most {MAX_LOGIT_BIAS} are accepted", "logit_bias")
    low, high = LOGIT_BIAS_RANGE
    for key, bias in value.items():
        if not _TOKEN_ID.fullmatch(key):
            raise _fail("'logit_bias' keys must be token ids: decimal integers as strings", "logit_bias")
        if not _is_number(bias) or not low <= bias <= high:
            raise _fail(
                f"'logit_bias' values must be numbers from {low:g} to {high:g}; token {key} has " + _described(bias),
                "logit_bias",
            )


def _check_stop(value: Any) -> None:
    if value is None:
        return
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise _fail("'stop' must be a string or a list of strings", "stop")
    if len(words) > MAX_STOP:
        raise _fail(f"'stop' has {len(words)} strings; at most {MAX_STOP} are accepted", "stop")
    if any(len(word) > MAX_STOP_CHARS for word in words):
        raise _fail(f"each 'stop' string must be at most {MAX_STOP_CHARS} characters", "stop")


def _check_template_kwargs(value: Any) -> None:
    if value is None:
        return
    allowed = ", ".join(sorted(TEMPLATE_KWARGS))
    if not isinstance(value, dict):
        raise _fail(f"'chat_template_kwargs' must be an object (keys: {allowed})", "chat_template_kwargs")
    for key, item in value.items():
        expected = TEMPLATE_KWARGS.get(key)
        if expected is None:
            raise _fail(f"'chat_template_kwargs' accepts only these keys: {allowed}", "chat_template_kwargs")
        if _json_type(item) != expected:
            raise _fail(
                f"'chat_template_kwargs.{key}' must be a JSON {expected}, got a JSON {_json_type(item)}",
                "chat_template_kwargs",
            )


def _check_role_mapping(value: Any) -> None:
    # Read only by models without a chat template (mlx_lm's convert_chat): role -> prefix string.
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise _fail("'role_mapping' must be an object of strings", "role_mapping")


def check_backend_fields(body: dict[str, Any]) -> None:
    """Every sampling and template field mlx_lm.server reads: types and ranges (model-independent)."""
    check_values(body)
    for name, (low, high) in NUMBER_RANGES.items():
        _check_number(body, name, low, high)
    _check_int(body, "top_k", 0)  # at or over the vocabulary: sent as 0 (app/proxy/context.py fit_top_k)
    # mx.random.seed takes an unsigned 64-bit integer: a negative seed crashed the backend's request thread.
    _check_int(body, "seed", 0, 2**63 - 1)
    for name in CONTEXT_SIZES:
        _check_int(body, name, 0)
    _check_logit_bias(body.get("logit_bias"))
    _check_stop(body.get("stop"))
    _check_template_kwargs(body.get("chat_template_kwargs"))
    _check_role_mapping(body.get("role_mapping"))


def check_content_part(part: Any, where: str) -> None:
    """A message content part: `text`, or `image_url` with a data: URL; any other type or shape is refused.

    mlx_lm.server fetches http(s) URLs from parts of type image_url, input_image and image (a string or
    an object's `url`, under `image_url` or `image`). An allow-list closes every such shape, including
    ones a later mlx_lm version may add.
    """
    if not isinstance(part, dict):
        raise _fail(f"{where} must be an object", "messages")
    part_type = part.get("type")
    if part_type in TEXT_PARTS:
        if not isinstance(part.get("text"), str):
            raise _fail(f"{where}: a text part needs a string 'text'", "messages")
    elif part_type in IMAGE_PARTS:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.startswith("data:"):
            raise _fail(f"{where}: only data: image URLs are accepted, not remote URLs", "messages")
    elif isinstance(part_type, str):
        raise _fail(
            f"{where}: content part type {part_type[:32]!r} is not supported; use 'text' (or 'image_url' "
            "with a data: URL)",
            "messages",
        )
    else:
        raise _fail(f"{where}: a content part needs a 'type'", "messages")


def for_backend(forward: dict[str, Any]) -> None:
    """Drop the fields sent as null (the backend's default applies); xtc values as floats."""
    for name in DEFAULTED:
        if name in forward and forward[name] is None:
            del forward[name]
    for name in FLOAT_ONLY:
        if name in forward:
            forward[name] = float(forward[name])


async def check_model_bounds(profile: Profile, model_dir: str | None, body: dict[str, Any]) -> None:
    """Values that index the model: logit_bias token ids (vocabulary), history sizes (context)."""
    bias = body.get("logit_bias")
    sizes = [name for name in CONTEXT_SIZES if isinstance(body.get(name), int)]
    if not bias and not sizes:
        return
    positions, vocab = await model_sizes(model_dir) if model_dir is not None else (None, None)
    if bias:
        if vocab is None:
            raise _fail(
                f"'logit_bias' cannot be checked against the vocabulary of {profile.name!r} (its size is unknown)",
                "logit_bias",
            )
        if any(int(key) >= vocab for key in bias):
            raise _fail(f"'logit_bias' token ids must be below the vocabulary size, {vocab}", "logit_bias")
    context = profile.context_length or positions or FALLBACK_CONTEXT
    for name in sizes:
        if body[name] > context:
            raise _fail(f"'{name}' must be between 0 and the context, {context}, got {_shown(body[name])}", name)
