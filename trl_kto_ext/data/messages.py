"""Conversational rows: every message shape a chat template renders is accepted; refusals are judged on the render."""

from __future__ import annotations

import json
from typing import Any

from trl_kto_ext.data.rows import row_ref

_ROLES = {"system", "user", "assistant"}


def _filled(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return value not in (None, [], {})


def blank_content(content: Any) -> bool:
    """Whether a message `content` holds no text: None, blank text, or multimodal parts that are all empty text."""
    if content is None or isinstance(content, str):
        return not (content or "").strip()
    if isinstance(content, list):  # multimodal parts: blank only when every part is a text part without text
        return all(
            isinstance(p, dict) and p.get("type", "text") == "text" and not _filled(p.get("text")) for p in content
        )
    return False


def has_payload(message: dict) -> bool:
    """Whether a message carries more than its role: content, or another field (tool_calls, reasoning_content, ...)."""
    return not blank_content(message.get("content")) or any(
        _filled(v) for k, v in message.items() if k not in ("role", "content")
    )


def structure_problem(value: Any) -> tuple[str, str] | None:
    """(kind, description) of a prompt/completion value no chat template could use, or None.

    kind is "empty", "type" or "messages". Message contents may be text, a list of parts or None (e.g. an assistant
    message that only holds `tool_calls`); whether such a message renders anything is judged by `check_rendered`.
    """
    if value is None:
        return "empty", "is missing (None)"
    if isinstance(value, str):
        return ("empty", f"is empty ({value!r})") if not value.strip() else None
    if not isinstance(value, list):
        return "type", f"is a {type(value).__name__} ({str(value)[:60]!r}), not text or a list of messages"
    if not value:
        return "empty", "is an empty list of messages"
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            return "messages", f"is not a list of {{'role', 'content'}} messages: message {k} is {message!r}"
        if not isinstance(message.get("role"), str) or not message["role"]:
            return "messages", f"is not a list of {{'role', 'content'}} messages: message {k} has no 'role'"
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            kind = type(content).__name__
            return "messages", f"has a message {k} whose 'content' is a {kind}, not text or a list of parts"
    if not any(has_payload(m) for m in value):
        return "empty", "is empty (no message has any content)"
    return None


def _plain_text_only(messages: list[dict]) -> bool:
    """Messages every chat template renders as their text: known roles, non-blank string content, no other field."""
    return all(
        m["role"] in _ROLES
        and isinstance(m.get("content"), str)
        and m["content"].strip()
        and not any(_filled(v) for k, v in m.items() if k not in ("role", "content"))
        for m in messages
    )


def _blanked(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": ""} for m in messages]


def template_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """`tools` and `chat_template_kwargs` of a row, as TRL passes them to `apply_chat_template`."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, **(row.get("chat_template_kwargs") or {})}


def check_rendered(processing_class, rows: list[dict[str, Any]], columns: list[str], name: str) -> None:
    """Renders every conversational row that is not plain text with the chat template (with its `tools`).

    ValueError when rendering fails, or when a value renders exactly as the same messages without content or fields
    (the template does not show them: KTO would train on nothing). `columns` are the text columns; a completion
    (`completion`, `chosen`, `rejected`) is rendered after its row's prompt.
    """
    render = processing_class.apply_chat_template
    for row, values in enumerate(rows):
        for column in columns:
            value = values.get(column)
            if not isinstance(value, list) or _plain_text_only(value):
                continue
            prompt = [] if column == "prompt" or not isinstance(values.get("prompt"), list) else values["prompt"]
            kwargs = dict(template_kwargs(values), tokenize=False, add_generation_prompt=column == "prompt")
            try:
                full = render(prompt + value, **kwargs)
                blank = render(prompt + _blanked(value), **kwargs)
            except Exception as err:  # any template error: TRL's tokenization would stop on the same row
                raise ValueError(
                    f"{column} at {row_ref(row)} of the {name} dataset cannot be rendered by the tokenizer's chat template "
                    f"({type(err).__name__}: {err}). Use a chat template that supports these messages (tool calls, "
                    "content parts, ...) or convert that row's messages to plain text content."
                ) from None
            if full == blank:
                fields = sorted({k for m in value for k, v in m.items() if k != "role" and _filled(v)})
                raise ValueError(
                    f"{column} at {row_ref(row)} of the {name} dataset renders no text with the tokenizer's chat template: "
                    f"the template does not show its {fields}, so KTO would train on nothing there. Use a chat "
                    "template that renders them (e.g. the model's own, with tool calls) or drop such rows."
                )
