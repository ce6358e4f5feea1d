"""``HOST:PORT`` parsing and the loopback rule (invariant 4).

A listen address may leave the host out (``:8443``, as ghostunnel and Go
accept): every address, IPv4 and IPv6. Its host is then ``""``, which is
never loopback, so plaintext listeners refuse it unless told otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(
        cls, text: str, *, allow_zero_port: bool = False, allow_any_host: bool = False
    ) -> HostPort:
        raw = text.strip()
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0 or raw[end + 1 : end + 2] != ":":
                raise AddressError(f"invalid address {text!r}: expected [IPv6]:PORT")
            host, port_text = raw[1:end], raw[end + 2 :]
        else:
            host, sep, port_text = raw.rpartition(":")
            if sep and not host and allow_any_host and port_text.isdigit():
                pass  # ":8443": every address
            elif sep and not host:
                raise AddressError(f"invalid address {text!r}: a host is required here (HOST:PORT)")
            elif not sep:
                raise AddressError(f"invalid address {text!r}: expected HOST:PORT")
            if ":" in host:
                raise AddressError(f"invalid address {text!r}: put an IPv6 host in brackets")
        if not port_text.isdigit():
            raise AddressError(f"invalid address {text!r}: port must be a number")
        port = int(port_text)
        if not (0 if allow_zero_port else 1) <= port <= 65535:
            raise AddressError(f"invalid address {text!r}: port out of range")
        return cls(host, port)

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def format_sockaddr(addr: object) -> str:
    """A socket address tuple as ``host:port`` for audit records."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
