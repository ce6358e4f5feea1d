"""Every flag also reads an environment variable (for containers).

``--trust-domain`` reads ``AGENT_PROXY_TRUST_DOMAIN``, ``--spiffe-id``
reads ``AGENT_PROXY_SPIFFE_ID`` and so on: the prefix, then the flag name
upper-cased with dashes as underscores. A flag given on the command line
wins over the environment.

How a command uses it: declare its flags with ``default=None`` (and
``action="store_true", default=None`` for switches, ``action="append",
default=None`` for repeatable ones), do *not* mark them ``required`` in
argparse, and call :func:`fill_from_env` first thing in the handler::

    FLAGS = (
        EnvFlag("trust_domain", "--trust-domain", required=True),
        EnvFlag("bundle", "--bundle", multi=True),
        EnvFlag("force", "--force", boolean=True),
    )

    def handler(args):
        fill_from_env(args, FLAGS)

A repeatable flag's variable holds comma-separated values; a switch's holds
``1/true/yes/on`` or ``0/false/no/off``. A required flag missing from both
raises :class:`UsageError` naming the flag and its variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.errors import UsageError

__all__ = ["ENV_PREFIX", "EnvFlag", "env_default", "env_help", "env_name", "fill_from_env"]

ENV_PREFIX = "AGENT_PROXY_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True)
class EnvFlag:
    """One flag that can come from the environment.

    ``dest`` is the Namespace attribute, ``flag`` the long option
    (``"--trust-domain"``). ``multi``: repeatable, a list of strings, the
    variable comma-separated. ``boolean``: a switch (``store_true``).
    ``required``: missing from both the command line and the environment is
    a usage error.
    """

    dest: str
    flag: str
    multi: bool = False
    boolean: bool = False
    required: bool = False

    @property
    def env(self) -> str:
        return env_name(self.flag)


def env_name(flag: str) -> str:
    """``"--trust-domain"`` -> ``"AGENT_PROXY_TRUST_DOMAIN"``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``flag``'s variable, or None when unset or empty."""
    env = os.environ if environ is None else environ
    value = env.get(env_name(flag))
    if value is None or value.strip() == "":
        return None
    return value


def env_help(help_text: str, flag: str) -> str:
    """``help_text`` with ``(env AGENT_PROXY_X)`` appended, for ``--help``."""
    # argparse treats "%" in help as a format character.
    return f"{help_text} (env {env_name(flag)})".replace("%", "%%")


def fill_from_env(
    args: argparse.Namespace,
    flags: Iterable[EnvFlag | tuple[str, str, bool]],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Fill the attributes of ``args`` not given on the command line.

    A tuple ``(dest, flag, multi)`` is shorthand for
    ``EnvFlag(dest, flag, multi=multi)``. An attribute counts as "not
    given" when it is None (or missing, or an empty list for a repeatable
    flag). Switches left unset become False.
    """
    for item in flags:
        spec = item if isinstance(item, EnvFlag) else EnvFlag(item[0], item[1], multi=item[2])
        current = getattr(args, spec.dest, None)
        if current is not None and not (spec.multi and current == []):
            continue
        raw = env_default(spec.flag, environ)
        value: object
        if raw is None:
            value = False if spec.boolean else current
        elif spec.boolean:
            word = raw.strip().lower()
            if word in _TRUE:
                value = True
            elif word in _FALSE:
                value = False
            else:
                raise UsageError(
                    f"{spec.env}={raw!r}: expected one of 1/true/yes/on or 0/false/no/off"
                )
        elif spec.multi:
            value = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            value = raw.strip()
        if spec.required and (value is None or value == []):
            raise UsageError(f"missing {spec.flag} (or set {spec.env})")
        setattr(args, spec.dest, value)
