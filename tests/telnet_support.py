"""A minimal telnet client side for the manhole tests: it answers the
server's option negotiation the way a plain ``telnet`` does (agrees to the
server echoing and suppressing go-ahead, refuses everything else) and
collects the text the server writes, ANSI escapes removed."""

from __future__ import annotations

import re

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
ECHO, SGA = 1, 3
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>78DEHMc]")


class TelnetClientSide:
    """Feed it what the server sent; it returns the bytes to send back."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self._pending = bytearray()

    def received(self, data: bytes) -> bytes:
        self._pending += data
        replies = bytearray()
        i = 0
        buf = self._pending
        while i < len(buf):
            byte = buf[i]
            if byte != IAC:
                self.raw.append(byte)
                i += 1
                continue
            if i + 1 >= len(buf):
                break  # the rest of the command has not arrived yet
            command = buf[i + 1]
            if command == IAC:
                self.raw.append(IAC)
                i += 2
            elif command in (DO, DONT, WILL, WONT):
                if i + 2 >= len(buf):
                    break
                option = buf[i + 2]
                if command == WILL:
                    replies += bytes([IAC, DO if option in (ECHO, SGA) else DONT, option])
                elif command == WONT:
                    replies += bytes([IAC, DONT, option])
                else:  # DO / DONT: this client enables nothing itself
                    replies += bytes([IAC, WONT, option])
                i += 3
            elif command == SB:
                end = buf.find(bytes([IAC, SE]), i)
                if end < 0:
                    break
                i = end + 2
            else:
                i += 2
        self._pending = bytearray(buf[i:])
        return bytes(replies)

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")


def line(text: str) -> bytes:
    """A line typed at the manhole's Python prompt: CR NUL is the Enter
    key (a lone CR would wait for the byte after it)."""
    return text.encode() + b"\r\0"
