"""AsyncEngine: the Engine on its own thread, so the event loop never waits on the model.

Commands (add, abort) cross into the engine thread through a queue; a step's outputs come back in
one `loop.call_soon_threadsafe` per event loop, whose callback puts each in its request's
asyncio.Queue. `generate` queues a request at once and returns its `RequestStream`, so a caller can
count, refuse or submit without awaiting.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from reprise.engine.engine import BatchFailed, Engine
from reprise.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("reprise")

# After idle, the first step waits for the rest of a burst: 8 streams opened at once arrive over a
# few ms (parsing, tokenizing, the GIL), and a step started on the first runs the other prefills in
# a second step. On CPU a prefill step has a large fixed part: one 64-token prompt takes ~120 ms,
# eight take ~520 ms in one step but ~600 ms split 1 + 7.
ADMISSION_QUIET_S = 0.002       # the burst has ended when no request came for this long ...
ADMISSION_WINDOW_MULTIPLE = 10  # ... or after this many quiet periods, however many still come


class EngineDead(RuntimeError):
    """The engine thread failed; the message says why."""


class RequestFailed(RuntimeError):
    """The batch running this request failed (its blocks are freed); the engine goes on."""


class RequestStream:
    """One queued request's outputs, as an async iterator; the last output is finished.

    `close()` before the last output aborts the request (its blocks go back to the pool); it is
    idempotent and safe at any time, also before the engine thread has seen the request.
    """

    def __init__(self, async_engine: AsyncEngine, request_id: str):
        self.request_id = request_id
        self.outputs: asyncio.Queue = asyncio.Queue()
        self._async_engine = async_engine
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        output = await self.outputs.get()
        if isinstance(output, BaseException):
            self._done = True
            raise output
        self._done = output.finished
        return output

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._async_engine.abort(self.request_id)


class AsyncEngine:
    """The engine loop on its own thread, or with `start=False` on whichever thread calls `run()`.

    `reprise serve` runs it on the main thread and the HTTP server on another: with OpenMP
    (PyTorch's CPU backend), parallel regions started from a thread other than the main one
    sleep and wake their workers every time, which made bf16 decode steps about 1.6x slower.

    The first step after idle admits a burst whole: it starts once no request has come for
    `admission_quiet_s` (at most ADMISSION_WINDOW_MULTIPLE of those after the first). A lone
    request pays that once; requests that arrive while steps run wait for no one.
    """

    def __init__(self, engine: Engine, start: bool = True, admission_quiet_s: float = ADMISSION_QUIET_S):
        self.engine = engine
        self._admission_quiet_s = admission_quiet_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()         # guards engine reads from other threads (stats, lookup)
        self._count_lock = threading.Lock()   # guards _num_queued_adds (written by both threads)
        self._num_queued_adds = 0
        self._stopping = threading.Event()
        self._finished = threading.Event()      # run() has returned
        self._thread = threading.Thread(target=self.run, name="reprise-engine", daemon=True) if start else None
        if self._thread is not None:
            self._thread.start()

    def generate(self, prompt_ids: list[int], params: SamplingParams, salt: str | None = None,
                 request_id: str | None = None, pins: tuple[tuple[int, float], ...] = ()) -> RequestStream:
        """Queues the request now and returns its outputs. Raises ValueError when it can never run
        (engine.check_prompt) and EngineDead when the engine thread is gone; an add the engine
        refuses later surfaces as the stream's first item. `pins`: see Engine.add_request."""
        self.engine.check_prompt(len(prompt_ids), params.max_tokens)
        if not self.is_alive:
            raise EngineDead("the engine thread is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id or f"req-{uuid.uuid4().hex}")
        with self._count_lock:
            self._num_queued_adds += 1
        self._commands.put(("add", (prompt_ids, params, salt, stream.request_id, loop, stream.outputs, pins)))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, function, *args):
        """Runs a read-only function on engine state between steps (for stats and dry-run lookups)."""
        with self._lock:
            return function(*args)

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not running: adds the engine thread has not taken yet, plus the
        scheduler's waiting queue (preempted requests included). Read without the step lock, so
        it may be off by the few requests admitted in the current step."""
        with self._count_lock:
            return self._num_queued_adds + len(self.engine.scheduler.waiting)

    @property
    def is_alive(self) -> bool:
        """False once the engine loop has stopped, by shutdown() or by an error it could not survive."""
        return not self._finished.is_set() and not self._stopping.is_set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops the loop; waits for it when it runs on its own thread."""
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        """The engine loop, until shutdown() or an error it cannot survive; then every waiting
        client is told, so none waits on a loop that is gone."""
        dead = EngineDead("the engine was shut down")
        try:
            self._loop()
        except BaseException as error:         # noqa: BLE001 - logged; /health reports the dead thread
            log.exception("the engine thread stopped")
            dead = EngineDead(f"the engine thread stopped: {type(error).__name__}")
        finally:                                # no client may wait on a thread that is gone
            self._finished.set()
            self._refuse_queued(dead)
            self._tell_all(dead)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            idle = not self.engine.has_work
            self._drain(block=idle)
            if not self.engine.has_work:
                continue
            if idle:
                self._admit_burst()
            try:
                with self._lock:
                    outputs = self.engine.step()
            except BatchFailed as failed:       # its requests are ended; the rest go on
                log.error("a batch failed, its %d requests end with an error: %s", len(failed.outputs), failed)
                for output in failed.outputs:
                    self._fail(output.request_id, RequestFailed(f"generation failed: {failed}"))
                continue
            except Exception as error:          # noqa: BLE001 - a failed step must not hang clients
                log.exception("engine step failed")
                self._fail_all(EngineDead(f"engine step failed: {error}"))
                continue
            self._deliver(outputs)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _admit_burst(self) -> None:
        """Runs the commands that keep coming, until a quiet period passes or the window closes."""
        deadline = time.monotonic() + self._admission_quiet_s * ADMISSION_WINDOW_MULTIPLE
        while (left := deadline - time.monotonic()) > 0:
            try:
                command = self._commands.get(timeout=min(self._admission_quiet_s, left))
            except queue.Empty:
                return
            self._run_command(*command)

    def _run_command(self, kind: str, payload) -> None:
        if kind == "add":
            self._add(*payload)
        elif kind == "abort":
            with self._lock:
                output = self.engine.abort(payload)
            if output is not None:
                self._deliver([output])

    def _add(self, prompt_ids, params, salt, request_id, loop, outputs, pins) -> None:
        try:
            with self._lock:
                self.engine.add_request(prompt_ids, params, salt, request_id, pins)
        except Exception as error:              # noqa: BLE001 - reported to the caller
            _post(loop, outputs, error)
        else:
            self._streams[request_id] = (loop, outputs)
        finally:
            with self._count_lock:              # after add_request: the request is never uncounted
                self._num_queued_adds -= 1

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's outputs over in one call per event loop: the loop wakes once a step,
        however many streams it serves, instead of once per stream."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        streams = self._streams
        for output in outputs:
            target = streams.pop(output.request_id, None) if output.finished else streams.get(output.request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], output))
        for loop, items in batches.items():
            _post_all(loop, items)

    def _fail(self, request_id: str, error: Exception) -> None:
        target = self._streams.pop(request_id, None)
        if target is not None:
            _post(*target, error)

    def _fail_all(self, dead: EngineDead) -> None:
        """Tells every client, then aborts their requests so their blocks go back to the pool."""
        with self._lock:
            for request_id in self._tell_all(dead):
                self.engine.abort(request_id)

    def _tell_all(self, dead: EngineDead) -> list[str]:
        """Ends every client's stream with `dead`; returns their request ids."""
        streams, self._streams = self._streams, {}
        for loop, outputs in streams.values():
            _post(loop, outputs, dead)
        return list(streams)

    def _refuse_queued(self, dead: EngineDead) -> None:
        """Answers the adds queued after the thread's last drain, so their streams end too."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                _post(payload[4], payload[5], dead)


def _post(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, item) -> None:
    """Hands `item` to a stream's queue on its event loop."""
    _post_all(loop, [(outputs, item)])


def _post_all(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Puts each item in its queue, all in one callback on `loop`; a closed loop has no one left to tell."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:
        pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)
