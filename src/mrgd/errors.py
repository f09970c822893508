"""User-facing input errors: one line that names the field and says how to fix it."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pydantic


class InputError(ValueError):
    """Bad input from the user (the CLI prints it and exits with code 2).

    ``str(err)`` is always one line, e.g.
    ``edit.json: regions[2].box: width must be > 0; give [x, y, w, h] fractions with w, h in (0, 1]``.
    """

    def __init__(self, message: str):
        # Collapse every whitespace run, line breaks included, so the message stays one line whatever it quotes.
        super().__init__(" ".join(str(message).split()) or "invalid input")


class Interrupted(BaseException):
    """Ctrl-C, with a line saying what the interrupted command left (the CLI prints it and exits with code 130).

    A BaseException like the KeyboardInterrupt it stands for, so that no ``except Exception`` on the way out takes
    it for an ordinary error.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) or "interrupted")


_HINTS = {
    "missing": "required field is missing; add it",
    "extra_forbidden": "unknown field; check its spelling or remove it",
}


def format_location(loc: Sequence[int | str]) -> str:
    """Join a pydantic error location the way it reads in the file: ``("regions", 2, "box")`` -> ``regions[2].box``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(err: pydantic.ValidationError, source: str | None = None) -> str:
    """One line for the first problem in ``err``: ``[source: ]field: what is wrong; how to fix it``."""
    problems = err.errors(include_url=False)
    first = problems[0]
    kind = first["type"]
    message = _HINTS.get(kind) or first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = re.sub(r" or instance of \w+", "", message)  # pydantic names the Python class; a file has none
    if kind not in _HINTS and kind != "value_error" and isinstance(first.get("input"), (str, int, float, type(None))):
        message += f" (got {_short(first['input'])})"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    where = format_location(first["loc"]) or "top level"
    line = f"{where}: {message}"
    return InputError(f"{source}: {line}" if source else line).args[0]
