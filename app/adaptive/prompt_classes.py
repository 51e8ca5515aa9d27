"""Prompt classes for acceptance statistics: "code" or "chat", "-sampled" above temperature 0.

The draft's acceptance differs with what is asked and collapses above temperature 0, so the estimator keeps
acceptance per class. A cheap heuristic on the request body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_CODE_WORDS = re.compile(
    r"```|\b(python|javascript|typescript|java|rust|golang|kotlin|swift|c\+\+|sql|bash|shell script|"
    r"function|def|class|method|implement|refactor|snippet|regex|dataclass|struct|compile|traceback|"
    r"stack trace|unit test|code only|source code)\b",
    re.IGNORECASE,
)
_CODE_SYMBOLS = re.compile(r"[{}();=<>\[\]]")


def _last_user_text(kind: str, body: Mapping[str, Any]) -> str:
    if kind != "chat":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else ""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_class(kind: str, body: Mapping[str, Any]) -> str:
    """Class "code" or "chat" from cheap features of the last user turn; "-sampled" above temperature 0.

    A heuristic that only splits acceptance statistics: a misfiled prompt costs a slower estimate,
    never a wrong answer. Sampling is its own class because acceptance collapses above temperature 0.
    """
    text = _last_user_text(kind, body)[:4000]
    symbols = len(_CODE_SYMBOLS.findall(text))
    is_code = bool(_CODE_WORDS.search(text)) or (len(text) > 40 and symbols / len(text) > 0.03)
    temperature = body.get("temperature")
    sampled = isinstance(temperature, int | float) and temperature > 0
    return ("code" if is_code else "chat") + ("-sampled" if sampled else "")
