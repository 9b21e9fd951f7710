"""The one exception type a user sees: what went wrong and what to do about it."""


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it without a traceback and exits non-zero."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  → {self.hint}"
