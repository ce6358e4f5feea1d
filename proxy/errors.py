"""Errors that end the process with one clear line and exit status 2.

Anything the operator got wrong (a flag, a file, a config key, a SPIFFE ID)
is raised as a :class:`UsageError` subclass; the CLI prints ``str(exc)`` on
one line and exits 2 without a traceback.
"""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UsageError(Exception):
    """A bad flag, config, file or ID: one line, exit status 2."""


def find_exception(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in ``exc`` or the exception groups nested in it:
    what trio raises out of a nursery (a bind error, a usage error)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, kind)
            if found is not None:
                return found
    return None
