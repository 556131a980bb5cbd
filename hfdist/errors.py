"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class HfdistError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message names the field, file or value."""

    exit_code = 2
