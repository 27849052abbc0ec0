"""The one exception qtune raises for anything a user can fix."""

from __future__ import annotations


class QtuneError(Exception):
    """A problem the user can fix: printed by the CLI as one `error:` line plus a hint, exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def first_line(exc: BaseException) -> str:
    """The first line of what an exception says (its type's name when it says nothing), for an error message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
