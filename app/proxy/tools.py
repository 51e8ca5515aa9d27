"""The request side of tool calling: the tools offered, what `tool_choice` asks, earlier calls.

`tools` and `tool_choice` are checked here so that a request the gateway cannot honour fails with
OpenAI's 400 naming the field, not somewhere in the backend. The conversation's earlier calls
(assistant messages with `tool_calls`) are checked too: mlx_lm.server `json.loads` every string
`arguments` before rendering the chat template (Qwen's template writes them with `tojson`), and a
string that is not JSON fails inside its generation path. Here it is a 400 naming `messages`, and
the gateway sends the arguments as the object the template expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import InvalidRequest
from app.proxy.toolcalls import TAG_OPEN

Choice = Literal["auto", "required", "function"]


@dataclass(frozen=True)
class ToolPlan:
    """How to read the answer of a request that offers function tools."""

    names: frozenset[str]  # the functions a parsed call may name
    choice: Choice
    forced: str | None = None  # the function a named `tool_choice` asks for
    # The call's opening that the backend was told to start the answer with (app/launcher/prefill.py);
    # the answer's text continues it.
    prefill: str = ""

    def __post_init__(self) -> None:
        if self.choice == "function" and self.forced is None:
            raise ValueError("a named tool_choice needs its function")


def forced_opening(plan: ToolPlan) -> str:
    """How a forced call starts: Qwen/Hermes's tag, then the object up to what the model must choose."""
    if plan.choice == "function":
        return f'{TAG_OPEN}\n{{"name": {json.dumps(plan.forced)}, "arguments": '
    if plan.choice == "required":
        return f'{TAG_OPEN}\n{{"name": "'
    return ""


def _function_names(tools: Any) -> frozenset[str]:
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of tool objects", param="tools")
    names = set()
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools[{index}] must be an object", param="tools")
        if tool.get("type", "function") != "function":
            continue  # another kind of tool: passed on, never parsed into a function call
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools[{index}].function.name must be a non-empty string", param="tools")
        names.add(name)
    return frozenset(names)


def _named_choice(choice: dict[str, Any]) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": "..."}}',
            param="tool_choice",
        )
    return name


def tool_plan(body: dict[str, Any]) -> ToolPlan | None:
    """The plan for a chat request, or None when its answer is plain text (no tools, or 'none')."""
    tools = body.get("tools")
    names = _function_names(tools) if tools is not None else frozenset()
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return ToolPlan(names, "auto") if names else None
    if choice == "none":
        return None
    if choice == "required":
        if not names:
            raise InvalidRequest(
                "'tool_choice' is 'required' but the request has no function tools", param="tool_choice"
            )
        return ToolPlan(names, "required")
    if isinstance(choice, dict):
        name = _named_choice(choice)
        if name not in names:
            offered = ", ".join(sorted(names)) or "(none)"
            raise InvalidRequest(
                f"'tool_choice' names the function {name!r}, which is not among the request's tools: {offered}",
                param="tool_choice",
            )
        # Only the named function may be called: a call to another tool stays text.
        return ToolPlan(frozenset({name}), "function", forced=name)
    raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or a function object", param="tool_choice")


def _call_for_template(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where} must be an object with function.name", param="messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise InvalidRequest(
                f"{where}.function.arguments is not valid JSON: {error.msg}", param="messages"
            ) from None
    elif arguments is None:
        arguments = {}
    return {**call, "function": {**function, "arguments": arguments}}


def messages_for_backend(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each earlier call's arguments as an object (a copy; the rest as sent)."""
    converted = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise InvalidRequest(f"messages[{index}].tool_calls must be a list", param="messages")
            where = f"messages[{index}].tool_calls"
            message = {**message, "tool_calls": [_call_for_template(c, f"{where}[{i}]") for i, c in enumerate(calls)]}
        converted.append(message)
    return converted
