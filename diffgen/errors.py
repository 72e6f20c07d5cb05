"""The exception types diffgen raises for problems a user can fix."""


class DiffgenError(Exception):
    """A user-facing failure: a missing or corrupt file, a folder that cannot be written.

    The CLI turns it into a one-line message on stderr and exit code 1.
    """


class InvalidSetting(DiffgenError):
    """A setting outside what is allowed (a range, a set of names, a combination).

    The CLI reports it as a usage error: a one-line message and exit code 2.
    """
