"""Chat templates: how a list of {role, content} messages becomes one prompt for a pathway.

A checkpoint may store its template as `chat_template.json`:

    {"roles": {"system": "{content}\\n\\n", "user": "User: {content}\\n",
               "assistant": "Assistant: {content}\\n"},
     "generation_prompt": "Assistant:", "stop": ["\\nUser:"]}

Each role's format has one `{content}`; the rendered prompt ends with `generation_prompt`, and
`stop` ends the assistant's turn (added to the caller's stop sequences). Checkpoints without one
use DEFAULT.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pathways.config import unknown_fields

FILE = "chat_template.json"


class ChatError(ValueError):
    """Messages or a template that cannot be used; the message names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    roles: Mapping[str, str]
    generation_prompt: str = "Assistant:"
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.roles:
            raise ChatError("a chat template needs at least one role", "roles")
        for role, fmt in self.roles.items():
            if not isinstance(fmt, str) or fmt.count("{content}") != 1:
                raise ChatError(
                    f"chat template role {role!r}: its format must hold '{{content}}' once; "
                    f"got {fmt!r}",
                    f"roles.{role}",
                )

    @classmethod
    def from_dict(cls, data: Any) -> ChatTemplate:
        if not isinstance(data, dict) or not isinstance(data.get("roles"), dict):
            raise ChatError('a chat template is {"roles": {ROLE: FORMAT, ...}, ...}', "roles")
        unknown = unknown_fields(cls, data)
        if unknown:
            raise ChatError(f"chat template: unknown field(s) {', '.join(unknown)}", "")
        stop = data.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ChatError("chat template: stop must be a list of non-empty strings", "stop")
        return cls(dict(data["roles"]), str(data.get("generation_prompt", "")), tuple(stop))

    def to_json(self) -> str:
        return json.dumps(
            {
                "roles": dict(self.roles),
                "generation_prompt": self.generation_prompt,
                "stop": list(self.stop),
            }
        )

    def render(self, messages: Sequence[Any]) -> str:
        """The prompt for `messages` (a list of {"role", "content"}); ChatError names the bad
        `messages[i].field`."""
        if not isinstance(messages, list | tuple) or not messages:
            raise ChatError("messages must be a non-empty list", "messages")
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ChatError(f"messages[{i}] must be an object", f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role not in self.roles:
                raise ChatError(
                    f"messages[{i}].role must be one of {', '.join(self.roles)}; got {role!r}",
                    f"messages[{i}].role",
                )
            if isinstance(content, list):  # OpenAI's content parts: text only
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise ChatError(
                            f"messages[{i}].content[{j}]: only text parts are supported",
                            f"messages[{i}].content",
                        )
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            if not isinstance(content, str):
                raise ChatError(f"messages[{i}].content must be a string", f"messages[{i}].content")
            parts.append(self.roles[role].replace("{content}", content))
        return "".join(parts) + self.generation_prompt


DEFAULT = ChatTemplate(
    {"system": "{content}\n\n", "user": "User: {content}\n", "assistant": "Assistant: {content}\n"},
    "Assistant:",
    ("\nUser:",),
)


def load(checkpoint: str | Path | None) -> ChatTemplate | None:
    """The template stored in `checkpoint`, or None when it has none (ChatError if unusable)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint) / FILE
    if not path.exists():
        return None
    try:
        return ChatTemplate.from_dict(json.loads(path.read_text()))
    except ValueError as e:
        raise ChatError(f"{path}: {e}", getattr(e, "param", "")) from None


def save(checkpoint: str | Path, template: ChatTemplate) -> Path:
    path = Path(checkpoint) / FILE
    path.write_text(template.to_json() + "\n")
    return path
