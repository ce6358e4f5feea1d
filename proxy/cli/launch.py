"""``agent-proxy launch --config FILE -- COMMAND [ARGS...]``: an agent beside its sidecar.

Theory of operation: the launcher is a small supervisor, not a trio program.
It starts the sidecar (``python -m proxy run --config FILE``) in its own
process group, so a Ctrl-C from the terminal reaches the agent and the
launcher but not the sidecar: the launcher decides when the sidecar stops.
It waits, with a deadline, until the sidecar says it is ready: the launcher
hands it the write end of a pipe (``run --ready-fd N``) and the sidecar
writes ``ready`` there once every listener is bound. Only our own child holds
that descriptor, so another process answering on the configured ports (a
second sidecar with another identity, say) can never make the launcher start
the agent: our child fails to bind, exits, and the launcher reports its error.
Then it starts the agent command with ``HTTP_PROXY`` pointing at the
sidecar's egress listener and with every variable that names the sidecar's
identity files removed.

One thread, one ``selectors`` loop, no polling. The loop waits on: the
sidecar's stderr (read, forwarded line by line to ours, and watched for the
``listening`` events that give the egress listener's bound address), the
readiness pipe, a wake-up pipe that ``signal`` writes each signal number to,
and one descriptor per child that becomes readable when the child exits (a
pidfd on Linux; elsewhere a pipe a waiter thread writes to). The sidecar
always logs JSON to the launcher (``--log-format json``); on a console the
launcher renders those lines for people.

What happens when:

* SIGTERM, SIGINT or SIGHUP to the launcher goes to the agent; SIGHUP also
  goes to the sidecar (it reloads its identity). The sidecar gets SIGTERM
  once the agent has exited, so the agent's last requests still have a way
  out while it shuts down.
* The agent exits: SIGTERM to the sidecar, which drains for its
  ``drain_timeout``; SIGKILL if it is still there ``_STOP_MARGIN`` seconds
  later. The launcher exits with the agent's status (128 + N when the agent
  was killed by signal N, as a shell reports it).
* The sidecar exits first: the agent has lost its only way to its peers, so
  it gets SIGTERM, then SIGKILL after ``_AGENT_GRACE`` seconds. The
  launcher prints one line and exits 70 (EX_SOFTWARE).
* The sidecar is not ready in time, or dies before it is (a port already
  taken, a bad identity): one line with the sidecar's own error, the agent is
  never started, exit 70.

Least privilege: run as root, ``--user`` starts the agent under another user
(its primary group, no supplementary groups unless ``--group``), so key
files that are 0600 and owned by the sidecar's user are unreadable to it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from proxy import logs
from proxy.cli.agent_env import (
    AgentUser,
    agent_environment,
    client_address,
    egress_listener,
    exit_status,
    identity_paths,
    readable_by,
    resolve_user,
)
from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.cli.launch_child import SidecarChild, exit_fd
from proxy.config import Config, load_config
from proxy.durations import parse_duration
from proxy.errors import UsageError
from proxy.netaddr import HostPort

__all__ = [
    "EX_SIDECAR",
    "AgentUser",
    "agent_environment",
    "egress_listener",
    "exit_status",
    "identity_paths",
    "register",
    "resolve_user",
]

log = structlog.get_logger("agent_proxy")

EX_SIDECAR = 70  # EX_SOFTWARE: the sidecar failed, not the agent
_AGENT_GRACE = 10.0  # seconds between SIGTERM and SIGKILL for the agent
_STOP_MARGIN = 5.0  # seconds past the sidecar's drain_timeout before SIGKILL
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_FLAGS = (
    EnvFlag("config", "--config", required=True),
    EnvFlag("ready_timeout", "--ready-timeout"),
    EnvFlag("user", "--user"),
    EnvFlag("group", "--group"),
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="run an agent command beside its sidecar",
        description=(
            "Start the sidecar FILE.toml describes, wait until it is ready, then run "
            "COMMAND with HTTP_PROXY pointing at the sidecar's egress listener. "
            "Exits with COMMAND's status."
        ),
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help=env_help("the sidecar's config", "--config"),
    )
    p.add_argument(
        "--ready-timeout",
        metavar="DURATION",
        default=None,
        help=env_help("how long the sidecar may take to be ready (default 30s)", "--ready-timeout"),
    )
    p.add_argument(
        "--user",
        metavar="NAME|UID",
        default=None,
        help=env_help("run the agent as this user (needs root)", "--user"),
    )
    p.add_argument(
        "--group",
        metavar="NAME|GID",
        default=None,
        help=env_help("the agent's group (default: the user's primary group)", "--group"),
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    p.set_defaults(handler=_launch)


# -- the supervisor -----------------------------------------------------------


class _Launch:
    def __init__(
        self,
        config: Config,
        config_path: str,
        command: Sequence[str],
        user: AgentUser | None,
        ready_timeout: float,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.command = list(command)
        self.user = user
        self.ready_timeout = ready_timeout
        self.egress = egress_listener(config)
        self.sel = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.sidecar: SidecarChild | None = None
        self.sidecar_rc: int | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_rc: int | None = None
        self._fds: list[int] = []

    # -- the event loop -----------------------------------------------

    def _pump(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            what = key.data
            if what == "signal":
                with contextlib.suppress(BlockingIOError):
                    self.signals.extend(os.read(key.fd, 64))
            elif what == "stderr":
                assert self.sidecar is not None
                if not self.sidecar.read_stderr():
                    self.sel.unregister(key.fd)
            elif what == "ready":
                assert self.sidecar is not None
                if not self.sidecar.read_ready() or self.sidecar.ready:
                    self.sel.unregister(key.fd)
            elif what == "sidecar-exit":
                self.sel.unregister(key.fd)
                assert self.sidecar is not None
                self.sidecar_rc = self.sidecar.proc.wait()
            elif what == "agent-exit":
                self.sel.unregister(key.fd)
                assert self.agent is not None
                self.agent_rc = self.agent.wait()

    def _watch(self, fd: int, what: str) -> None:
        self._fds.append(fd)
        self.sel.register(fd, selectors.EVENT_READ, what)

    def _take_signals(self) -> list[int]:
        taken, self.signals = self.signals, []
        return [s for s in taken if s in _FORWARDED]

    def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not done():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._pump(remaining)
            self.signals.clear()  # already stopping: nothing more to forward
        return True

    # -- phases -------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        self._fds += [wake_r, wake_w]
        self.sel.register(wake_r, selectors.EVENT_READ, "signal")
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, lambda *_: None) for s in _FORWARDED}
        try:
            return self._run()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
            self.sel.close()
            if self.sidecar is not None and self.sidecar.proc.stderr is not None:
                self.sidecar.proc.stderr.close()
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> int:
        self.sidecar = SidecarChild(self.config_path)
        self._fds.append(self.sidecar.ready_fd)
        self.sel.register(self.sidecar.ready_fd, selectors.EVENT_READ, "ready")
        self._watch(exit_fd(self.sidecar.proc), "sidecar-exit")
        self.sel.register(self.sidecar.stderr_fd, selectors.EVENT_READ, "stderr")
        status = self._wait_ready()
        if status is not None:
            self._stop_sidecar()
            return status
        proxy_url = self._proxy_url()
        if proxy_url is None:
            log.warning(
                'no [[outbound]] with protocol = "http-proxy": the agent gets no HTTP_PROXY'
            )
        env = agent_environment(os.environ, self.config, proxy_url, self.user)
        self._warn_about_access()
        try:
            self.agent = subprocess.Popen(
                self.command,
                env=env,
                user=self.user.uid if self.user else None,
                group=self.user.gid if self.user else None,
                extra_groups=[] if self.user else None,
            )
        except OSError as exc:
            _say(f"cannot start {self.command[0]!r}: {exc.strerror or exc}")
            self._stop_sidecar()
            return 127 if isinstance(exc, FileNotFoundError) else 126
        self._watch(exit_fd(self.agent), "agent-exit")
        log.info(
            "agent started",
            agent_pid=self.agent.pid,
            sidecar_pid=self.sidecar.proc.pid,
            http_proxy=proxy_url,
            user=self.user.uid if self.user else os.geteuid(),
        )
        while self.agent_rc is None and self.sidecar_rc is None:
            self._pump(None)
            for signum in self._take_signals():
                _kill(self.agent, signum)
                if signum == signal.SIGHUP:
                    _kill(self.sidecar.proc, signum)
        if self.agent_rc is not None:
            log.info("agent exited", status=self.agent_rc, stopping="sidecar")
            self._stop_sidecar()
            return exit_status(self.agent_rc)
        assert self.sidecar_rc is not None
        _say(f"the sidecar exited with status {exit_status(self.sidecar_rc)}; stopping the agent")
        _kill(self.agent, signal.SIGTERM)
        if not self._wait_until(lambda: self.agent_rc is not None, _AGENT_GRACE):
            _kill(self.agent, signal.SIGKILL)
            self._wait_until(lambda: self.agent_rc is not None, _AGENT_GRACE)
        return EX_SIDECAR

    def _proxy_url(self) -> str | None:
        assert self.sidecar is not None
        if self.egress is None:
            return None
        listen = self.egress.listen
        if not listen.port:
            bound = self.sidecar.listening.get(self.egress.name)
            if bound is None:
                return None
            listen = HostPort.parse(bound)
        return f"http://{client_address(listen)}"

    def _wait_ready(self) -> int | None:
        """None once the sidecar is ready; otherwise the launcher's exit status."""
        assert self.sidecar is not None
        end = time.monotonic() + self.ready_timeout
        while True:
            for signum in self._take_signals():
                if signum == signal.SIGHUP:
                    _kill(self.sidecar.proc, signum)
                    continue
                _say(f"{signal.Signals(signum).name} before the agent started; stopping")
                return exit_status(-signum)
            if self.sidecar_rc is not None:
                # Read what it said on its way out, so its error is ours too.
                self._wait_until(lambda: not self._reading(), 2.0)
                why = f": {self.sidecar.last_error}" if self.sidecar.last_error else ""
                _say(
                    f"the sidecar exited with status {exit_status(self.sidecar_rc)} "
                    f"before it was ready{why}"
                )
                return EX_SIDECAR
            egress_known = self.egress is None or self._proxy_url() is not None
            if self.sidecar.ready and egress_known:
                return None
            remaining = end - time.monotonic()
            if remaining <= 0:
                hint = ""
                if self.sidecar.ready:
                    hint = (
                        f" (it never logged the address of {self.egress.name!r}; "  # type: ignore[union-attr]
                        "is log_level above info?)"
                    )
                _say(f"the sidecar was not ready within {self.ready_timeout:g}s{hint}")
                return EX_SIDECAR
            self._pump(remaining)

    def _stop_sidecar(self) -> None:
        assert self.sidecar is not None
        if self.sidecar_rc is None:
            _kill(self.sidecar.proc, signal.SIGTERM)
            deadline = self.config.drain_timeout + _STOP_MARGIN
            if not self._wait_until(lambda: self.sidecar_rc is not None, deadline):
                log.warning("sidecar still running after its drain deadline: killing it")
                _kill(self.sidecar.proc, signal.SIGKILL)
                self._wait_until(lambda: self.sidecar_rc is not None, _STOP_MARGIN)
        # Forward what the sidecar wrote on its way out.
        self._wait_until(lambda: self.sidecar_rc is not None and not self._reading(), 2.0)

    def _reading(self) -> bool:
        assert self.sidecar is not None
        try:
            self.sel.get_key(self.sidecar.stderr_fd)
        except KeyError:
            return False
        return True

    def _warn_about_access(self) -> None:
        if self.config.identity.source == "workload-api":
            return
        if self.user is None:
            if os.geteuid() == 0:
                log.warning(
                    "the agent runs as root and can read the sidecar's identity files; use --user"
                )
            return
        key = self.config.identity.key
        if key is not None and readable_by(str(key), self.user):
            log.warning("the agent's user can read the sidecar's key", path=str(key))


def _kill(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _say(message: str) -> None:
    sys.stderr.write(f"agent-proxy: launch: {message}\n")
    sys.stderr.flush()


def _launch(args: argparse.Namespace) -> int:
    fill_from_env(args, _FLAGS)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("launch: give the agent's command after '--'")
    ready_timeout = 30.0
    if args.ready_timeout is not None:
        ready_timeout = parse_duration(args.ready_timeout).total_seconds()
        if ready_timeout <= 0:
            raise UsageError("--ready-timeout must be greater than zero")
    user = resolve_user(args.user, args.group, os.geteuid())
    # The same plan and identity checks as check-config and run: a bad file
    # is one line and exit 2 here, before any process starts.
    from proxy.runtime.plan import build_plan, check_identity

    config = build_plan(load_config(args.config)).config
    check_identity(config)
    logs.configure(config.log_level)
    return _Launch(config, str(args.config), command, user, ready_timeout).run()
