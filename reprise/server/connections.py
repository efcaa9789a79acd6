"""Connection limits that uvicorn leaves to the application: a deadline on reading a request's head.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) and answers 503 past a number of
open connections (`limit_concurrency`), but it waits forever for the head of a request: a client
that opens connections and sends nothing, or trickles its headers a byte at a time (slowloris),
holds them, and with them the connection cap, for as long as it likes. `timed_h11(read_timeout_s)`
is uvicorn's h11 protocol with that deadline: from a connection's first byte (or its opening), and
again from the first byte of each later request on it, the whole head must arrive within
`read_timeout_s`, else the connection is closed. The body's deadline is the app's
(middleware.BodyLimit), where a 408 can still be sent.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(read_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config(http=...)) with a `read_timeout_s` deadline on heads."""

    class TimedH11Protocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None
        _waiting_after = None          # the cycle that was current when the deadline was armed

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()                     # the first byte of a later request on a kept-alive connection
            super().data_received(data)
            if self._head_deadline is not None and self.cycle is not self._waiting_after:
                self._disarm()                  # a new request's head arrived

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_after = self.cycle
            self._head_deadline = self.loop.call_later(read_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if self.cycle is self._waiting_after and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
