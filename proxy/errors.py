"""Errors that end the process with one clear line and exit status 2.

Anything the operator got wrong (a flag, a file, a config key, a SPIFFE ID)
is raised as a :class:`UsageError` subclass; the CLI prints ``str(exc)`` on
one line and exits 2 without a traceback.
"""


class UsageError(Exception):
    """A bad flag, config, file or ID: one line, exit status 2."""
