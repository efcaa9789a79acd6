"""A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol on a pipe.

`chromium --dump-dom --virtual-time-budget=N` dumps the page once virtual time runs out, and a
streamed response body does not hold virtual time back: the chat page's turns were still empty in
its dump. So tests drive the browser through `--remote-debugging-pipe` (JSON messages, each ended
by a NUL byte, on file descriptors 3 and 4) and wait for a condition the page sets itself.
"""
from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import signal
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium")


class Browser:
    """One headless Chromium with one page; `with Browser() as browser: browser.open(url, ...)`."""

    def __init__(self, width: int = 1280, height: int = 900):
        # its helper processes may still write the profile as they die: a leftover file is no failure
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        to_browser_read, self._to_browser = _high_pipe()
        self._from_browser, from_browser_write = _high_pipe()
        flags = ["--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
                 f"--window-size={width},{height}", f"--user-data-dir={self._profile.name}", "about:blank"]
        # the browser reads commands on fd 3 and writes replies on fd 4
        script = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self._process = subprocess.Popen(["bash", "-c", script, CHROMIUM, *flags], pass_fds=(to_browser_read,
                                         from_browser_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._ids = itertools.count(1)
        self._buffer = b""
        targets = self._send("Target.getTargets")["targetInfos"]
        page = next(target["targetId"] for target in targets if target["type"] == "page")
        self._session = self._send("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self._send("Emulation.setDeviceMetricsOverride", self._session, width=width, height=height,
                   deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        os.killpg(self._process.pid, signal.SIGKILL)      # Chromium and every helper process it started
        self._process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def open(self, url: str, until: str, timeout: float = 60.0) -> str:
        """Loads `url` and waits until the JavaScript expression `until` is true; returns the DOM."""
        self._send("Page.navigate", self._session, url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(until):
            if time.monotonic() > deadline:
                raise AssertionError(f"{until!r} was not true {timeout} s after loading {url}:\n{self.dom()[-3000:]}")
            time.sleep(0.2)
        return self.dom()

    def evaluate(self, expression: str):
        result = self._send("Runtime.evaluate", self._session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> None:
        data = self._send("Page.captureScreenshot", self._session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def _send(self, method: str, session: str | None = None, **params) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are numbered 10 or above, clear of the 3 and 4 the browser is given."""
    ends = os.pipe()
    high = tuple(fcntl.fcntl(end, fcntl.F_DUPFD, 10) for end in ends)
    for end in ends:
        os.close(end)
    return high
