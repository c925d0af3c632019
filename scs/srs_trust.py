"""Sealing and opening SRS messages: who may speak on the cluster bus.

Anyone with credentials on the broker can publish to the cluster's
exchanges and read its fanout, so an SRS message is trusted only for what
it proves about itself.  ``MessageCodec`` turns one message (a routing
header and a payload) into the bytes on the wire and back, and refuses,
with a ``Rejected`` naming the reason, anything it cannot vouch for.

Wire format (protocol version 2)::

    {"m": "<inner JSON text>", "s": "<hex HMAC-SHA256 of the inner text>"}

    inner: {"proto", "version", "cluster", "type", "sender", "incarnation",
            "to", "ts", "nonce", ["cid"], ["reply_to"], ["re"],
            "payload": {...}                      (no cluster secret)
            "sealed": "<base64 AES-GCM of the payload JSON>"   (with one)}

With a cluster secret (``--cluster-secret-file``):

* the HMAC covers the whole inner text, so the routing metadata (``to``,
  ``cid``, ``reply_to``, ``re``), the sender and the timestamp are signed
  along with the body; the signature is checked before any field is read;
* a message whose ``ts`` is more than ``window`` seconds from our clock is
  stale, and a ``(sender, nonce)`` seen within the window is a replay;
* the payload is encrypted (AES-256-GCM, from ``cryptography``), so broker
  passwords in app settings never cross the bus in clear, not even on the
  fanout that every broker user may bind to.

Both keys are derived from the secret with HKDF-SHA256 under distinct
labels, so the MAC key and the encryption key are never the same bytes.

Without a secret the codec still checks the shape of every message but
vouches for nothing: anyone who can reach the broker is a member (the
agent refuses to start that way on a non-loopback broker unless told to).
"""

from __future__ import annotations

import base64
import heapq
import hmac
import json
import os
from collections import Counter
from collections.abc import Callable
from hashlib import sha256
from typing import Any

import attr
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = "scs-srs"
VERSION = "2.0"
MAJOR_VERSION = 2

# Largest message body accepted from the bus: a listing of a few thousand
# instance objects fits; anything larger is dropped before it is parsed.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Messages further than this from our clock are stale (both directions:
# clocks of the cluster's machines are expected to be kept by NTP).
DEFAULT_WINDOW = 30.0
# Bound on remembered nonces.  Only messages with a valid signature are
# remembered, so this is reached only by a real agent sending ~3,000
# messages a second for the whole window; past it the oldest are forgotten
# early (and a replay of those would still have to be fresh).
MAX_REMEMBERED_NONCES = 100_000
MIN_SECRET_BYTES = 16
# Timestamps are seconds since the epoch; anything past this is not one.
MAX_TIMESTAMP = 1e11

# Why a message was dropped; the keys of ``scs_srs_rejected_total{reason}``.
REASONS = (
    "oversized",
    "malformed",
    "unsigned",
    "bad-signature",
    "stale",
    "replayed",
    "foreign",
    "misrouted",
    "unexpected-reply",
    "not-a-member",
    "untrusted-peer",
)

_HEADER_FIELDS = ("cid", "reply_to", "re")


class Rejected(Exception):
    """A message the codec will not vouch for; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "", sender: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.sender = sender


class SecretFileError(ValueError):
    """The cluster secret file cannot be used."""


def read_secret_file(path: str) -> bytes:
    """The cluster secret: the first line of ``path``, at least 16 bytes.

    The file must not be readable by other users: the secret is the whole
    of the cluster's trust.
    """
    try:
        status = os.stat(path)
        with open(path, "rb") as f:
            first = f.readline(4096).strip()
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror}") from None
    if status.st_mode & 0o077:
        raise SecretFileError(f"{path} is readable by other users (chmod 600 it)")
    if len(first) < MIN_SECRET_BYTES:
        raise SecretFileError(f"the secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return first


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"scs-srs " + label).derive(secret)


@attr.s(auto_attribs=True, frozen=True)
class Message:
    """One SRS message, opened: the signed header fields and the payload."""

    type: str
    sender: str
    incarnation: str
    to: str
    ts: float
    payload: dict[str, Any]
    cid: str | None = None
    reply_to: str | None = None
    re: str | None = None


class MessageCodec:
    """Encodes and opens the messages of one agent; see the module docstring."""

    def __init__(
        self,
        cluster: str,
        secret: bytes | None = None,
        *,
        clock: Callable[[], float],
        window: float = DEFAULT_WINDOW,
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_nonces: int = MAX_REMEMBERED_NONCES,
    ) -> None:
        self.cluster = cluster
        self.signed = secret is not None
        self._clock = clock
        self._born = clock()
        self._window = window
        self._random_bytes = random_bytes
        self._max_nonces = max_nonces
        self._mac_key = _derive(secret, b"hmac-sha256") if secret is not None else b""
        self._aead = AESGCM(_derive(secret, b"aes-256-gcm")) if secret is not None else None
        # (expiry, sender, nonce) in a heap, and the same pairs in a set.
        self._expiries: list[tuple[float, str, str]] = []
        self._seen: set[tuple[str, str]] = set()
        self.rejected: Counter[str] = Counter()

    # -- sending -------------------------------------------------------------

    def encode(
        self,
        kind: str,
        sender: str,
        incarnation: str,
        to: str,
        payload: dict[str, Any],
        **header: str | None,
    ) -> bytes:
        inner: dict[str, Any] = {
            "proto": PROTOCOL,
            "version": VERSION,
            "cluster": self.cluster,
            "type": kind,
            "sender": sender,
            "incarnation": incarnation,
            "to": to,
            "ts": self._clock(),
            "nonce": self._random_bytes(12).hex(),
        }
        for name in _HEADER_FIELDS:
            if header.get(name) is not None:
                inner[name] = header[name]
        if self._aead is not None:
            iv = self._random_bytes(12)
            sealed = self._aead.encrypt(iv, _json(payload), None)
            inner["sealed"] = base64.b64encode(iv + sealed).decode("ascii")
        else:
            inner["payload"] = payload
        text = _json(inner).decode("ascii")
        outer: dict[str, Any] = {"m": text}
        if self.signed:
            outer["s"] = self._mac(text)
        return _json(outer)

    # -- receiving -----------------------------------------------------------

    def open(self, body: bytes, *, me: str) -> Message:
        """The message in ``body``, or ``Rejected``; ``me`` is our agent id
        (a message must be addressed to us or to everyone)."""
        try:
            return self._open(body, me)
        except Rejected as e:
            self.rejected[e.reason] += 1
            raise

    def count(self, reason: str) -> None:
        """Count a message dropped by the caller after opening it."""
        self.rejected[reason] += 1

    def _open(self, body: bytes, me: str) -> Message:
        if len(body) > MAX_MESSAGE_BYTES:
            raise Rejected("oversized", f"{len(body)} bytes")
        try:
            outer = json.loads(body)
        except (ValueError, RecursionError):
            raise Rejected("malformed", "not JSON") from None
        if not isinstance(outer, dict) or not isinstance(outer.get("m"), str) or not outer["m"].isascii():
            raise Rejected("malformed", "not an SRS envelope")
        text: str = outer["m"]
        if self.signed:
            signature = outer.get("s")
            if not isinstance(signature, str):
                raise Rejected("unsigned")
            if not hmac.compare_digest(signature.encode("ascii", "replace"), self._mac(text).encode("ascii")):
                raise Rejected("bad-signature")
        try:
            inner = json.loads(text)
        except (ValueError, RecursionError):
            raise Rejected("malformed", "inner message is not JSON") from None
        if not isinstance(inner, dict):
            raise Rejected("malformed", "inner message is not an object")
        header = _checked_header(inner)
        sender = header["sender"]
        if inner.get("proto") != PROTOCOL or str(inner.get("version")).split(".", 1)[0] != str(MAJOR_VERSION):
            raise Rejected("foreign", f"protocol {inner.get('proto')!r} {inner.get('version')!r}", sender)
        if inner.get("cluster") != self.cluster:
            raise Rejected("foreign", f"cluster {inner.get('cluster')!r}", sender)
        if header["to"] not in ("*", me):
            raise Rejected("misrouted", f"addressed to {header['to']!r}", sender)
        if self.signed:
            self._check_fresh(sender, header["ts"], inner.get("nonce"))
        payload = self._payload(inner, sender)
        return Message(payload=payload, **header)

    def _check_fresh(self, sender: str, ts: float, nonce: Any) -> None:
        now = self._clock()
        if abs(now - ts) > self._window:
            raise Rejected("stale", f"{now - ts:.1f} s old", sender)
        if ts < self._born:
            # Sent before this codec existed: the nonces it would be checked
            # against are gone with the previous run (a restart, or an agent
            # that just joined), so it could be a replay.
            raise Rejected("stale", "sent before this agent started", sender)
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
            raise Rejected("malformed", "bad nonce", sender)
        self._forget_expired(now)
        key = (sender, nonce)
        if key in self._seen:
            raise Rejected("replayed", "", sender)
        self._seen.add(key)
        heapq.heappush(self._expiries, (ts + self._window, sender, nonce))

    def _forget_expired(self, now: float) -> None:
        while self._expiries and (self._expiries[0][0] < now or len(self._expiries) >= self._max_nonces):
            _expiry, sender, nonce = heapq.heappop(self._expiries)
            self._seen.discard((sender, nonce))

    def _payload(self, inner: dict[str, Any], sender: str) -> dict[str, Any]:
        if self._aead is not None:
            sealed = inner.get("sealed")
            if not isinstance(sealed, str):
                raise Rejected("malformed", "payload is not sealed", sender)
            try:
                raw = base64.b64decode(sealed, validate=True)
                plain = self._aead.decrypt(raw[:12], raw[12:], None)
                payload = json.loads(plain)
            except (ValueError, InvalidTag, RecursionError):
                raise Rejected("malformed", "sealed payload does not open", sender) from None
        else:
            payload = inner.get("payload")
        if not isinstance(payload, dict):
            raise Rejected("malformed", "payload is not an object", sender)
        return payload

    def _mac(self, text: str) -> str:
        return hmac.new(self._mac_key, b"scs-srs/2\n" + text.encode("ascii"), sha256).hexdigest()


def _checked_header(inner: dict[str, Any]) -> dict[str, Any]:
    """The routing header of an inner message, type-checked."""
    fields: dict[str, Any] = {}
    for name in ("type", "sender", "incarnation", "to"):
        value = inner.get(name)
        if not isinstance(value, str) or not value or len(value) > 255:
            raise Rejected("malformed", f"bad {name}")
        fields[name] = value
    ts = inner.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < MAX_TIMESTAMP:
        raise Rejected("malformed", "bad ts", fields["sender"])
    fields["ts"] = float(ts)
    for name in _HEADER_FIELDS:
        value = inner.get(name)
        if value is not None and (not isinstance(value, str) or not value.isascii() or len(value) > 255):
            raise Rejected("malformed", f"bad {name}", fields["sender"])
        fields[name] = value
    return fields


def _json(value: Any) -> bytes:
    """ASCII-only JSON bytes (txAMQP 0.8.2 carries only those intact)."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")
