"""IncrementalDetokenizer: text pieces that are always valid UTF-8, and stop strings."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing list of ids; `push` returns only text that is final.

    Text is final when it no longer ends in a replacement character (a multi-byte character cut
    between tokens) and cannot be the start of a stop string. A found stop string ends the text
    just before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0      # decoding restarts here, one piece back, for leading-space rules
        self._read_offset = 0        # ids before this are already in self.text
        self.text = ""               # all final text so far
        self._emitted = 0            # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one id; returns the new final text (may be empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip_special)
        after = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return self._release(final=False)
        self.text += after[len(before):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: whatever is held back (a partial stop string) is final."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            self._cut_at_stop()
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._holdback)
        piece = self.text[self._emitted:end]
        self._emitted = end
        return piece

    def _cut_at_stop(self) -> None:
        start = max(0, self._emitted - self._holdback)
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
