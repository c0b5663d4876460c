"""Errors a user can act on.

Every failure that comes from the user's input (a path, a file, a field, a flag) is raised as an
``EngrainError`` with a message that names what is wrong and what to do. The CLI prints the message
and exits with status 2; it never shows a traceback for these.
"""


class EngrainError(Exception):
    """A failure caused by input the user can fix; the message says what and how."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n{hint}")
