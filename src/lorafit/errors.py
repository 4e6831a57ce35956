"""The one exception type for bad user input."""


class LorafitError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints it as one line on stderr and exits with code 2; library callers can
    catch it as a ``ValueError``.
    """
