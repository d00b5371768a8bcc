"""One exception type for everything the user can fix.

The CLI prints a `TunerError` as one clear line (no traceback) and exits with
`exit_code`; any other exception is a bug in tuner and keeps its traceback.
"""


class TunerError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class Interrupted(TunerError):
    """Training stopped by a signal after saving a checkpoint; exit code 128 + signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
