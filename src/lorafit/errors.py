"""The exception types the command line turns into one line: bad user input, and an interruption."""


class LorafitError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints it as one line on stderr and exits with code 2; library callers can
    catch it as a ``ValueError``.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the line to show, and the shell's exit code (128 + the signal's number)."""

    def __init__(self, message: str = "interrupted", exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
