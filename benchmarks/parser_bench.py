"""Microseconds per HTTP/1.1 message parse: ``python -m benchmarks.parser_bench``.

One parser per connection, reused across keep-alive messages, as on the
sidecar's hot path: the llhttp wrapper (proxy/http/llhttp.py) against the
h11 one (proxy/http/h11_parser.py, the differential test's oracle), both
behind the same MessageParser interface and with the same strictness (the
h11 wrapper runs the raw-head checks of proxy/http/framing.py first, and
drives h11's other side with a throw-away message per cycle, which is
counted: a sidecar on h11 would pay it).
Each message is fed as one chunk; the best of ``--repeat`` runs is shown.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from proxy.http.h11_parser import H11Parser
from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import NEED_DATA, End, MessageParser, Role

GET = (
    b"GET /timesheets/2026-11?limit=50 HTTP/1.1\r\nHost: hr-api\r\n"
    b"User-Agent: payroll-agent/1.0\r\nAccept: application/json\r\n"
    b"Accept-Encoding: gzip\r\nX-Request-Id: 4bf92f3577b34da6a3ce929d0e0e4736\r\n\r\n"
)
_BODY = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"file_correction",' \
    b'"arguments":{"employee":"e-1042","hours":7.5}}}'  # fmt: skip
POST = (
    b"POST /mcp HTTP/1.1\r\nHost: tax-service\r\nUser-Agent: payroll-agent/1.0\r\n"
    b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
    b"Mcp-Session-Id: 1868a90c-2e6e-4c1a-9a7d-2a3bfb9d4d3c\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_BODY)
) + _BODY
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 64\r\nConnection: keep-alive\r\n"
    b'ETag: "6929f0a0-40"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 63 + b"\n"
)


def parser_loop(parser: MessageParser, message: bytes) -> Callable[[int], None]:
    """Feed ``message`` and read its events to the end, ``n`` times."""

    def run(n: int) -> None:
        for _ in range(n):
            parser.feed(message)
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    raise RuntimeError("incomplete message")
                if type(event) is End:
                    break
            parser.start_next_cycle()

    return run


def best_us(run: Callable[[int], None], n: int, repeat: int) -> float:
    run(min(n, 200))  # warm up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parser_bench", description=__doc__)
    p.add_argument("-n", type=int, default=20000, help="messages per run")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    cases: list[tuple[str, Role, bytes]] = [
        ("GET request, 6 fields", "request", GET),
        ("POST tools/call, 7 fields + 131 B", "request", POST),
        ("200 response, 8 fields + 64 B", "response", RESPONSE),
    ]
    print("| message | llhttp wrapper (µs) | h11 wrapper (µs) | h11 / llhttp |")
    print("|---|---|---|---|")
    for title, role, message in cases:
        fast = best_us(parser_loop(LlhttpParser(role), message), args.n, args.repeat)
        slow = best_us(parser_loop(H11Parser(role), message), args.n, args.repeat)
        print(f"| {title} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
