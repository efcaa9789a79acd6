"""AsyncEngine: the Engine on its own thread, so the event loop never waits on the model.

Commands (add, abort) cross into the engine thread through a queue; outputs come back to each
request's asyncio.Queue through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from reprise.engine.engine import Engine
from reprise.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("reprise")


class EngineDead(RuntimeError):
    """The engine thread failed; the message says why."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()         # guards engine reads from other threads (stats, lookup)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reprise-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, salt: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields outputs as tokens come; the last one is finished. Closing the iterator early aborts."""
        self.engine.check_prompt(len(prompt_ids), params.max_tokens)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        self._commands.put(("add", (prompt_ids, params, salt, request_id, loop, outputs, added)))
        finished = False
        try:
            await added
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:           # also when cancelled before the engine thread saw the add
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, function, *args):
        """Runs a read-only function on engine state between steps (for stats and dry-run lookups)."""
        with self._lock:
            return function(*args)

    @property
    def num_waiting_commands(self) -> int:
        return self._commands.qsize()

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not self.engine.has_work)
            if not self.engine.has_work:
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except Exception as error:          # noqa: BLE001 - a failed step must not hang clients
                log.exception("engine step failed")
                self._fail_all(error)
                continue
            for output in outputs:
                self._deliver(output)

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

    def _run_command(self, kind: str, payload) -> None:
        if kind == "add":
            prompt_ids, params, salt, request_id, loop, outputs, added = payload
            try:
                with self._lock:
                    request = self.engine.add_request(prompt_ids, params, salt, request_id)
            except Exception as error:          # noqa: BLE001 - reported to the caller
                loop.call_soon_threadsafe(_settle, added, None, error)
                return
            self._streams[request.request_id] = (loop, outputs)
            loop.call_soon_threadsafe(_settle, added, request.request_id, None)
        elif kind == "abort":
            with self._lock:
                output = self.engine.abort(payload)
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        target = self._streams.get(output.request_id)
        if output.finished:
            self._streams.pop(output.request_id, None)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, output)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for request_id in list(self._streams):
                self.engine.abort(request_id)
        dead = EngineDead(f"engine step failed: {error}")
        for loop, outputs in self._streams.values():
            loop.call_soon_threadsafe(outputs.put_nowait, dead)
        self._streams.clear()


def _settle(future: asyncio.Future, value, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
