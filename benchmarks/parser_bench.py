"""Microseconds per HTTP/1.1 message parse: ``python -m benchmarks.parser_bench``.

One parser per connection, reused across keep-alive messages, as on the
sidecar's hot path: the llhttp wrapper (proxy/http/llhttp.py) against h11
driven the way proxy/http/conn.py drove it (the strict raw-head checks,
then h11's events; a server-role h11 must also serialise a response before
it parses the next request, which is counted, since the sidecar pays it).
Each message is fed as one chunk; the best of ``--repeat`` runs is shown.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import h11

from proxy.http.llhttp import LlhttpParser
from proxy.http.wire import NEED_DATA, End

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


def llhttp_loop(role: str, message: bytes) -> Callable[[int], None]:
    parser = LlhttpParser(role)  # type: ignore[arg-type]

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


def _strict_head_checks() -> Callable[[bytes], None]:
    try:
        from proxy.http.framing import check_head, find_head_end
    except ImportError:  # the h11 path moved on; measure h11 alone
        return lambda data: None

    def check(data: bytes) -> None:
        end = find_head_end(data)
        assert end is not None
        check_head(data[:end], 65536, 100)

    return check


def h11_loop(role: str, message: bytes) -> Callable[[int], None]:
    if role == "request":
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536 + 1024)
        check = _strict_head_checks()
        reply = h11.Response(status_code=200, headers=[(b"content-length", b"0")])
    else:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536 + 1024)
        request = h11.Request(method=b"GET", target=b"/64b", headers=[(b"host", b"b")])

    def run(n: int) -> None:
        for _ in range(n):
            if role == "request":
                check(message)
            else:
                conn.send(request)
                conn.send(h11.EndOfMessage())
            conn.receive_data(message)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    raise RuntimeError("incomplete message")
                if type(event) is h11.EndOfMessage:
                    break
            if role == "request":
                conn.send(reply)
                conn.send(h11.EndOfMessage())
            conn.start_next_cycle()

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
    cases = [("GET request, 6 fields", "request", GET),
             ("POST tools/call, 7 fields + 131 B", "request", POST),
             ("200 response, 8 fields + 64 B", "response", RESPONSE)]  # fmt: skip
    print("| message | llhttp wrapper (µs) | h11 as conn.py drove it (µs) | h11 / llhttp |")
    print("|---|---|---|---|")
    for title, role, message in cases:
        fast = best_us(llhttp_loop(role, message), args.n, args.repeat)
        slow = best_us(h11_loop(role, message), args.n, args.repeat)
        print(f"| {title} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
