"""Errors the server answers with: a status code and an OpenAI-style JSON body naming the field.

{"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import re

from pydantic import ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def from_validation(e: ValidationError) -> ApiError:
    """The first pydantic error as a 422 naming its field (`early_exit.threshold`, `prompts[3]`)."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", "body")
    param = _loc(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if not param:  # a model-level check: its message starts with the field it is about
        param = leading_name(msg) or "body"
    if err["type"] == "model_type" and param == "body":
        msg = "the body must be a JSON object"
    return ApiError(422, msg if msg.startswith(param) else f"{param}: {msg}", param)


def _loc(loc: tuple) -> str:
    """('early_exit', 'threshold') -> 'early_exit.threshold'; ('prompts', 3) -> 'prompts[3]'.
    Union branch names that pydantic puts in the location ('str', 'list[int]') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)) and part not in ("str", "int", "float", "bool"):
            out += ("." if out else "") + str(part)
    return out


def leading_name(message: str) -> str | None:
    """The field a message starts with: 'top_p: cannot ...' -> 'top_p'; 'prompts[2] is empty' -> 'prompts'."""
    m = re.match(r"([A-Za-z_][A-Za-z0-9_.]*)", message)
    return m.group(1) if m else None


def engine_error(e: ValueError, names: dict[str, str], default: str) -> ApiError:
    """An engine ValueError (which names the engine's setting) as a 400 naming the API's field."""
    msg = str(e)
    engine_name = leading_name(msg) or ""
    return ApiError(400, msg, names.get(engine_name, default))
