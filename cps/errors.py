"""The one exception type for mistakes a user can make; the CLI turns it into one line and exit 2."""


class CpsError(Exception):
    """A user-facing error: bad input, missing data, unknown names, unreachable services."""
