"""The exception types the command line turns into one line: bad user input, and an interruption."""


class LorafitError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints it as one line on stderr and exits with code 2; library callers can
    catch it as a ``ValueError``.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the line to show, and the shell's exit code (128 + the signal's number)."""

    def __init__(self, message: str = "interrupted", exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
