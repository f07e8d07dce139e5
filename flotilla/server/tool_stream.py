"""Streamed tool calls: a reply's text turned into OpenAI's chat deltas while it is generated.

OpenAI streams a call as one delta with its ``index``, ``id``, ``type`` and ``function.name`` (``arguments``
empty), then deltas of ``function.arguments`` text, so a client can show the arguments as they are written.
This does the same for both formats of ``flotilla.server.tools``: content is passed on as it comes (holding
back only what could still begin a call), a call's header is sent once its name is known, and the
arguments object is passed on character by character until its closing brace (a small JSON scanner follows
strings and nesting so that a brace inside a string does not end it). A call the scanner cannot follow
(the arguments before the name, arguments that are not an object) is sent whole once its block ends.
What the deltas add up to parses as the non-streamed reply does.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from flotilla.server.tools import HERMES, parse_tool_calls

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
# the start of a call up to its arguments' value: {"name": "...", "arguments" (or "parameters"):
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class _ObjectScan:
    """Follows one JSON object's text: ``feed`` returns how many of the characters belong to it (all of them
    until the closing brace)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = False
        self.done = False

    def feed(self, text: str) -> int:
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallStream:
    """One choice's text in, OpenAI chat delta pieces out (``{"content": ...}`` or ``{"tool_calls": [...]}``)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.buf = ""          # text received and not passed on yet
        self.state = "content" if fmt == HERMES else "start"
        self.calls = 0         # calls started so far (the next call's OpenAI index)
        self.scan = _ObjectScan()

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            step = getattr(self, f"_{self.state}")()
            if step is None:
                return out
            out.extend(step)

    def finish(self) -> list[dict[str, Any]]:
        """The end of the reply: what is still held goes out as content, as a call parsed whole, or as the
        rest of a call's arguments (a call cut short by the length limit keeps what it had)."""
        rest, self.buf = self.buf, ""
        state, self.state = self.state, "done"
        if state in ("content", "start", "plain"):
            return [{"content": rest}] if rest else []
        if state in ("head", "whole"):
            return self._parse_whole((_OPEN if self.fmt == HERMES else "") + rest)
        if state == "args" and rest:
            return [self._arguments(rest)]
        return []  # after a call's arguments: its closing brace and tag

    # ------------------------------------------------------------------------------------------ states
    # each returns the pieces of one transition, or None when it needs more text
    def _start(self):
        """Llama 3 JSON: a reply is a call when it is one JSON object; its first visible character decides."""
        if not self.buf.strip():
            return None
        self.state = "head" if self.buf.lstrip()[0] == "{" else "plain"
        return []

    def _plain(self):
        if not self.buf:
            return None
        text, self.buf = self.buf, ""
        return [{"content": text}]

    def _content(self):
        """Hermes: content until ``<tool_call>``; a tail that could be the start of one is held back."""
        at = self.buf.find(_OPEN)
        if at >= 0:
            before, self.buf = self.buf[:at], self.buf[at + len(_OPEN):]
            self.state = "head"
            return [{"content": before}] if before.strip() else []
        keep = next((n for n in range(min(len(_OPEN) - 1, len(self.buf)), 0, -1)
                     if _OPEN.startswith(self.buf[-n:])), 0)
        cut = len(self.buf) - keep
        text, self.buf = self.buf[:cut], self.buf[cut:]
        return [{"content": text}] if text else None

    def _head(self):
        """Wait for the call's name; then stream its arguments, or (another shape) send it whole at its end."""
        m = _HEAD.match(self.buf)
        if m is not None and m.end() < len(self.buf):
            if self.buf[m.end()] != "{":
                self.state = "whole"
                return []
            self.buf = self.buf[m.end():]
            self.state, self.scan = "args", _ObjectScan()
            self.calls += 1
            return [{"tool_calls": [{"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}",
                                     "type": "function",
                                     "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}}]}]
        if self.fmt == HERMES and _CLOSE in self.buf:
            self.state = "whole"
            return []
        return None

    def _whole(self):
        """Hermes: a call the scanner cannot follow, parsed once ``</tool_call>`` closes it (Llama 3: the
        reply is the call, parsed by ``finish``)."""
        at = self.buf.find(_CLOSE) if self.fmt == HERMES else -1
        if at < 0:
            return None
        block, self.buf = _OPEN + self.buf[:at + len(_CLOSE)], self.buf[at + len(_CLOSE):]
        self.state = "content"
        return self._parse_whole(block)

    def _parse_whole(self, block: str) -> list[dict[str, Any]]:
        content, calls = parse_tool_calls(block, self.fmt)
        out: list[dict[str, Any]] = []
        for call in calls:
            out.append({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
        if content and content.strip():
            out.append({"content": content})
        return out

    def _args(self):
        if not self.buf:
            return None
        n = self.scan.feed(self.buf)
        piece, self.buf = self.buf[:n], self.buf[n:]
        if self.scan.done:
            self.state = "tail"
        return [self._arguments(piece)]

    def _arguments(self, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": text}}]}

    def _tail(self):
        """After the arguments: the call object's closing brace, then (Hermes) ``</tool_call>`` and content
        again; a Llama 3 reply is over (anything after its call is dropped)."""
        at = self.buf.find(_CLOSE) if self.fmt == HERMES else -1
        if at < 0:
            if self.fmt != HERMES:
                self.buf = ""
            return None
        self.buf = self.buf[at + len(_CLOSE):]
        self.state = "content"
        return []


def merge_pieces(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """The pieces of one engine delta as one OpenAI delta: content joined, a call's pieces joined."""
    out: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    for p in pieces:
        if "content" in p:
            out["content"] = out.get("content", "") + p["content"]
        for call in p.get("tool_calls", []):
            have = calls.get(call["index"])
            if have is None:
                calls[call["index"]] = {**call, "function": dict(call["function"])}
            else:
                have["function"]["arguments"] = have["function"].get("arguments", "") + \
                    call["function"].get("arguments", "")
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out
