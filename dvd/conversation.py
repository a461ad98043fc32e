"""The conversation rules, written once: the gateway checks them on OpenAI JSON, the language server again on the
proto (its gRPC API can be called directly, and the model's chat template must never see anything else)."""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")  # what the chat template renders
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


def role_error(role: str) -> str | None:
    """Why a message with this role cannot be served, or None."""
    if role == "function":
        return "'function' messages (OpenAI's deprecated function calling) are not supported: use 'tool'"
    if role not in ROLES and role not in ROLE_ALIASES:
        return f"unknown role {role!r}; expected one of {', '.join((*ROLES, *ROLE_ALIASES))}"
    return None


def template_role(role: str) -> str:
    """The role the chat template gets (aliases resolved)."""
    return ROLE_ALIASES.get(role, role)


def tool_calls_error(role: str) -> str | None:
    """Why a message with this role cannot carry tool calls, or None."""
    return None if role == "assistant" else "only assistant messages carry 'tool_calls'"


def image_error(role: str) -> str | None:
    """Why a message with this role cannot carry images, or None."""
    return None if role == "user" else "images are only allowed in user messages"
