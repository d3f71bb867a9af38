"""The one user-facing error type: its message is printed as a single line (CLI exit code 2)."""


class LowbitError(Exception):
    """A problem with the user's input (file, model, request, option), stated in one line."""
