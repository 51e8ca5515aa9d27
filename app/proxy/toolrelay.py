"""Turn a chat answer's tool calls into OpenAI `tool_calls`, chunk by chunk of the backend's stream.

Each chunk's `delta.content` goes through the parser (app/proxy/toolcalls.py): text it releases stays
`content`, a call becomes one `delta.tool_calls` entry carrying `index`, `id`, `type`, the function's
name and its whole arguments (OpenAI's first-chunk shape; clients join later argument fragments by
`index`, and there are none). Calls mlx_lm.server parsed itself (its `<tool_call>` parser, for
templates it recognises) come as `delta.tool_calls` already: they are passed on with the same index
sequence and `call_` ids. The last chunk flushes what the parser still holds and says
`finish_reason: "tool_calls"` when the answer made a call and stopped on its own.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from app.proxy.toolcalls import Event, ToolCall, ToolCallStream
from app.proxy.tools import ToolPlan


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            inner = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        # mlx_lm.server json.dumps the parsed arguments: a model that wrote them as a JSON string
        # gets a string of a string; clients expect the object's JSON.
        if isinstance(inner, str) and inner.lstrip().startswith("{"):
            return inner
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


class ToolCallRelay:
    """Rewrites the deltas of one chat answer; see the module docstring."""

    def __init__(self, plan: ToolPlan) -> None:
        # A forced call's opening was the prompt's end: the answer's text continues it.
        self.parser = ToolCallStream(plan.names, prefix=plan.prefill)
        self.calls_made = 0

    def rewrite(self, chunk: dict[str, Any]) -> bool:
        """Rewrite `chunk` in place; False when nothing is left in it for the client."""
        keep = False
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                keep = True
                continue
            events = self.parser.feed(delta.pop("content", None) or "")
            if choice.get("finish_reason") is not None:
                events += self.parser.finish()
            calls = [self._from_backend(call) for call in delta.pop("tool_calls", None) or ()]
            calls += [self._delta(event) for event in events if isinstance(event, ToolCall)]
            content = _text(events)
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
            if choice.get("finish_reason") == "stop" and self.calls_made:
                choice["finish_reason"] = "tool_calls"
            keep = keep or bool(content or calls or choice.get("finish_reason") or _other_output(choice))
        return keep

    def _delta(self, call: ToolCall) -> dict[str, Any]:
        entry = {
            "index": self.calls_made,
            "id": call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        self.calls_made += 1
        return entry

    def _from_backend(self, call: Any) -> Any:
        if not isinstance(call, dict):
            return call
        function = call.get("function")
        if not isinstance(function, dict):
            return call
        given = call.get("id")
        entry = {
            "index": self.calls_made,
            "id": given if isinstance(given, str) and given.startswith("call_") else call_id(),
            "type": "function",
            "function": {**function, "arguments": _arguments_text(function.get("arguments"))},
        }
        self.calls_made += 1
        return entry


def _text(events: list[Event]) -> str:
    return "".join(event for event in events if isinstance(event, str))


def _other_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("reasoning") or choice.get("logprobs"))


def parse_message(message: dict[str, Any], plan: ToolPlan) -> bool:
    """Parse a whole (unstreamed) message in place; True when it made a call."""
    relay = ToolCallRelay(plan)
    chunk = {"choices": [{"delta": message, "finish_reason": "stop"}]}
    relay.rewrite(chunk)
    for call in message.get("tool_calls") or ():
        call.pop("index", None)
    message.setdefault("content", None)
    return relay.calls_made > 0
