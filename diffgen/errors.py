"""The one exception type diffgen raises for problems a user can fix."""


class DiffgenError(Exception):
    """A user-facing failure: bad input, a missing file, an unsupported combination.

    The CLI turns it into a one-line message on stderr and exit code 1.
    """
