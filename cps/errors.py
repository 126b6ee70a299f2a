"""The one exception type for mistakes a user can make; the CLI turns it into one line and exit 2."""


class CpsError(Exception):
    """A user-facing error: bad input, missing data, unknown names, unreachable services."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
