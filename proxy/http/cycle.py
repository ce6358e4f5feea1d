"""Whether a connection may carry another message (pure, no I/O).

Theory of operation. A parser reads one direction; this is what h11's
connection state machine decided for both: each side of one exchange (the
message we read, the message we write) goes IDLE -> BODY -> DONE, and the
connection is reusable only when both sides are DONE and nothing said it
must close. What makes it close (RFC 9112 section 9.3):

* a message that does not allow keep-alive (HTTP/1.0, ``Connection: close``),
* a message framed by the end of the connection (a response read until
  close, or written until close to an HTTP/1.0 client),
* a protocol switch (101; the connection then carries another protocol),
* anything broken on either side (:meth:`Cycle.broken`).

``expect_continue`` is h11's ``they_are_waiting_for_100_continue``: the
request asked for ``100 Continue`` and neither a body byte nor any answer
has passed since.
"""

from __future__ import annotations

import enum

from proxy.http.wire import Framing, Head


class Side(enum.Enum):
    IDLE = "idle"  # no head yet
    BODY = "body"  # head done, body under way
    DONE = "done"  # message complete


class CycleError(Exception):
    """We asked for a next cycle the connection cannot carry (our bug)."""


class Cycle:
    __slots__ = ("close_reason", "expect_continue", "peer_said_close", "reading", "switched",
                 "writing")  # fmt: skip

    def __init__(self) -> None:
        self.reading = Side.IDLE
        self.writing = Side.IDLE
        self.close_reason: str | None = None  # set once: the connection must end
        self.switched = False
        self.expect_continue = False
        self.peer_said_close = False  # the peer's own head ended the connection

    # -- what happened -------------------------------------------------------

    def read_head(self, head: Head) -> None:
        # Even an empty body has its end still to read (as h11 has it).
        self.reading = Side.BODY
        if not head.keep_alive:
            self.peer_said_close = True
            self.must_close("no keep-alive" if head.version == b"1.1" else "HTTP/1.0")
        if head.framing is Framing.UNTIL_CLOSE:
            self.must_close("body read until close")
        if head.status == 101:
            self.switched = True
            self.must_close("switched protocols")
        self.expect_continue = (
            bool(head.method)
            and head.version == b"1.1"
            and head.framing is not Framing.NONE
            and any(
                n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in head.headers
            )
        )

    def read_body(self) -> None:
        self.expect_continue = False

    def read_end(self) -> None:
        self.reading = Side.DONE
        self.expect_continue = False

    def wrote_informational(self, status: int) -> None:
        self.expect_continue = False
        if status == 101:
            self.switched = True
            self.must_close("switched protocols")

    def wrote_head(self, close: bool) -> None:
        self.expect_continue = False
        self.writing = Side.BODY  # done only once the end is written, even with no body
        if close:
            self.must_close("we said close")

    def wrote_end(self) -> None:
        self.writing = Side.DONE

    def must_close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason

    def broken(self, reason: str) -> None:
        """An error on either side: the framing can no longer be trusted."""
        self.must_close(reason)

    # -- what it allows ------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return (
            self.reading is Side.DONE
            and self.writing is Side.DONE
            and self.close_reason is None
            and not self.switched
        )

    @property
    def may_answer(self) -> bool:
        """No answer head has been written in this exchange (a server side)."""
        return self.writing is Side.IDLE

    @property
    def answered(self) -> bool:
        return self.writing is Side.DONE

    def next_cycle(self) -> None:
        # reusable, read in place: this runs twice per exchange
        if not (
            self.reading is Side.DONE
            and self.writing is Side.DONE
            and self.close_reason is None
            and not self.switched
        ):
            raise CycleError(f"the connection cannot carry another message: {self.close_reason}")
        self.reading = self.writing = Side.IDLE
