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
import ctypes
import grp
import json
import os
import pwd
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from proxy import logs, notify
from proxy.cli.envflags import ENV_PREFIX, EnvFlag, env_help, fill_from_env
from proxy.config import Config, OutboundConfig, load_config
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
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104

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


# -- pure parts: what the agent gets -----------------------------------------


@dataclass(frozen=True, slots=True)
class AgentUser:
    uid: int
    gid: int
    name: str | None  # None: a numeric UID with no passwd entry
    home: str | None


def _lookup_group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(f"--group {text!r}: no such group") from None


def resolve_user(user: str | None, group: str | None, euid: int) -> AgentUser | None:
    """The user to run the agent as, or None to run it as ourselves."""
    if user is None and group is None:
        return None
    if euid != 0:
        raise UsageError("--user/--group need root: only root can start the agent as another user")
    if user is None:
        raise UsageError("--group needs --user")
    entry: pwd.struct_passwd | None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise UsageError(f"--user {user!r}: no such user") from None
        entry = None
    if entry is None and group is None:
        raise UsageError(f"--user {user}: no passwd entry for this UID, so give --group too")
    uid = int(user) if entry is None else entry.pw_uid
    gid = _lookup_group(group) if group is not None else entry.pw_gid  # type: ignore[union-attr]
    if entry is None:
        return AgentUser(uid, gid, None, None)
    return AgentUser(uid, gid, entry.pw_name, entry.pw_dir)


def egress_listener(config: Config) -> OutboundConfig | None:
    """The listener HTTP_PROXY points at: the first ``http-proxy`` outbound."""
    return next((o for o in config.outbound if o.protocol == "http-proxy"), None)


def identity_paths(config: Config) -> list[str]:
    """Every path through which the sidecar's identity could be read."""
    ident = config.identity
    paths: list[str] = []
    if ident.source == "files":
        for p in (ident.cert, ident.key, ident.bundle, *ident.federation.values()):
            if p is not None:
                paths.append(str(p))
    elif ident.source == "dev" and ident.state_dir is not None:
        paths.append(str(ident.state_dir))
    elif ident.source == "workload-api" and ident.endpoint and ident.endpoint.startswith("unix:"):
        paths.append(ident.endpoint.removeprefix("unix://"))
    real = [os.path.realpath(p) for p in paths]
    return sorted({*paths, *real})


def _mentions(value: str, paths: Sequence[str]) -> bool:
    """True when ``value`` contains one of ``paths``, or one of its
    ``os.pathsep`` parts is the directory that holds one of them."""
    if any(p and p in value for p in paths):
        return True
    dirs = {os.path.dirname(p).rstrip("/") for p in paths} - {""}
    return any(part.rstrip("/") in dirs for part in value.split(os.pathsep) if part)


def agent_environment(
    environ: Mapping[str, str],
    config: Config,
    proxy_url: str | None,
    user: AgentUser | None = None,
) -> dict[str, str]:
    """The agent's environment: ours, minus anything that leads to the
    sidecar's identity, plus the proxy variables.

    Removed: ``AGENT_PROXY_*`` (our own flags, the config path among them),
    ``SPIFFE_ENDPOINT_SOCKET``, and every variable whose value names an
    identity file, the dev CA's directory, the Workload API socket or a
    directory holding one of them. Set: ``HTTP_PROXY``/``http_proxy`` to the
    egress listener, and ``NO_PROXY``/``no_proxy`` to loopback only, so an
    inherited exclusion cannot send a routed host around the sidecar while
    the agent still reaches its own loopback services directly.
    """
    paths = identity_paths(config)
    env: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) or name == "SPIFFE_ENDPOINT_SOCKET":
            continue
        if _mentions(value, paths):
            continue
        env[name] = value
    if proxy_url is not None:
        env["HTTP_PROXY"] = env["http_proxy"] = proxy_url
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    if user is not None and user.name is not None:
        env["USER"] = env["LOGNAME"] = user.name
        if user.home:
            env["HOME"] = user.home
    return env


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when killed by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def _client_address(hp: HostPort) -> HostPort:
    """Where to connect to reach a listener bound to ``hp``."""
    return HostPort(_LOOPBACK_FOR.get(hp.host, hp.host), hp.port)


def _readable_by(path: str, user: AgentUser) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == user.gid:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)


# -- the supervisor -----------------------------------------------------------


def _exit_fd(proc: subprocess.Popen[bytes]) -> int:
    """A descriptor that becomes readable when ``proc`` exits."""
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            return os.pidfd_open(proc.pid)
    r, w = os.pipe()

    def wait() -> None:
        proc.wait()
        os.write(w, b"x")
        os.close(w)

    threading.Thread(target=wait, name=f"wait-{proc.pid}", daemon=True).start()
    return r


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook so the sidecar gets SIGTERM if the launcher is killed
    outright (Linux ``PR_SET_PDEATHSIG``). The libc lookup happens here, in
    the parent; the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


class _Sidecar:
    """The sidecar process, its readiness pipe and what its log lines told us."""

    def __init__(self, config_path: str) -> None:
        ready_r, ready_w = os.pipe()
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "proxy", "run", "--config", config_path),
                    *("--ready-fd", str(ready_w), "--log-format", "json"),
                ],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(ready_w,),
                process_group=0,
                # preexec_fn is unsafe with threads; the launcher has none yet.
                preexec_fn=_die_with_parent(),
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            # Only the child may hold the write end: then end of file on
            # ready_r means the child is gone.
            os.close(ready_w)
        self.ready_fd = ready_r
        os.set_blocking(ready_r, False)
        self._ready_buffer = b""
        self.ready = False
        assert self.proc.stderr is not None
        self.stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(self.stderr_fd, False)
        self._partial = b""
        self.last_error: str | None = None
        self.listening: dict[str, str] = {}
        self._console = logs.current_format() == "console"

    def read_ready(self) -> bool:
        """Read the readiness pipe; False at end of file."""
        try:
            data = os.read(self.ready_fd, 64)
        except BlockingIOError:
            return True
        self._ready_buffer = (self._ready_buffer + data)[-64:]
        if notify.READY_LINE in self._ready_buffer:
            self.ready = True
        return bool(data)

    def read_stderr(self) -> bool:
        """Forward what the sidecar wrote; False at end of file."""
        try:
            data = os.read(self.stderr_fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            return False
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)
        return True

    def _line(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            obj = None
            if raw.strip():
                self.last_error = raw.decode("utf-8", "replace").strip()
        out = raw
        if obj is not None and self._console:
            out = logs.render_event(obj).encode("utf-8", "replace")
        # A closed stderr (``... 2>&1 | head``) must not end supervision:
        # keep reading, so the sidecar never blocks on a full pipe.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            sys.stderr.buffer.write(out + b"\n")
            sys.stderr.buffer.flush()
        if obj is None:
            return
        event, address = obj.get("event"), obj.get("address")
        if event == "listening" and isinstance(address, str):
            self.listening[str(obj.get("listener"))] = address


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
        self.sidecar: _Sidecar | None = None
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
        self.sidecar = _Sidecar(self.config_path)
        self._fds.append(self.sidecar.ready_fd)
        self.sel.register(self.sidecar.ready_fd, selectors.EVENT_READ, "ready")
        self._watch(_exit_fd(self.sidecar.proc), "sidecar-exit")
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
        self._watch(_exit_fd(self.agent), "agent-exit")
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
        return f"http://{_client_address(listen)}"

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
                    "the agent runs as root and can read the sidecar's identity files; "
                    "use --user"
                )
            return
        key = self.config.identity.key
        if key is not None and _readable_by(str(key), self.user):
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
    config = load_config(args.config)
    logs.configure(config.log_level)
    return _Launch(config, str(args.config), command, user, ready_timeout).run()
