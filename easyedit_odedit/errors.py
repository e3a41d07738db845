"""The plugin's own error types.

Every check on user input raises one of these *before* any weight changes, with a message that
names the field, the value it got, and how to fix it.
"""


class ODEditError(ValueError):
    """Bad input or configuration for ODEdit (a ValueError, so existing handlers keep working)."""

    def __init__(self, field: str, value, fix: str, problem: str = "is invalid"):
        self.field, self.value, self.fix = field, value, fix
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"{field} {problem} (got {shown}). Fix: {fix}")


class ODEditFileNotFoundError(ODEditError, FileNotFoundError):
    """A file the configuration or the request names does not exist."""

    def __init__(self, field: str, path, fix: str):
        super().__init__(field, str(path), fix, problem="names a file that does not exist")


class ODEditNumericalError(RuntimeError):
    """The ODEdit objective produced NaN or inf; the model was restored before this was raised."""
