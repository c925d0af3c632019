"""Access control for the HTTP surfaces (``--auth-token-file``).

One secret token guards everything.  The API and ``/metrics`` take it only
as ``Authorization: Bearer <token>``; the admin page also takes it through
HTTP basic auth (any user name, the token as password) or a login form that
sets a signed, expiring session cookie.  Every comparison runs in constant
time (``hmac.compare_digest``) so that response timing does not leak how
much of a guess was right.

``guarded`` wraps the whole site: it answers 401 (JSON) for any request
outside ``/admin/`` that lacks the token, before the request reaches the
API, so that a refused request cannot change anything.  The admin page does
its own checks because it must answer a browser with a login form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

log = Logger(namespace="scs.http.auth")

# Paths that do their own authentication (the admin page: login form).
ADMIN_PREFIX = b"/admin"
SESSION_COOKIE = b"scs_session"
# A logged-in browser stays logged in this long.
SESSION_LIFETIME = 12 * 3600.0
MAX_TOKEN_LENGTH = 4096


class TokenFileError(Exception):
    """The token file cannot be used; the message says why."""


def read_token_file(path: str) -> str:
    """The token in ``path``: its first line, stripped of whitespace."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TOKEN_LENGTH + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"cannot read the token file {path!r}: {e}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise TokenFileError(f"the token file {path!r} is empty")
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise TokenFileError(f"the token in {path!r} must be printable ASCII of at most {MAX_TOKEN_LENGTH} characters")
    if len(token) < 16:
        # A short token can be guessed over the network; refuse it rather
        # than give a false sense of safety.
        raise TokenFileError(f"the token in {path!r} is too short (at least 16 characters)")
    return token


class TokenAuth:
    """Checks requests against one secret token."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        if not token:
            raise ValueError("empty token")
        self._token = token.encode("ascii")
        self._clock = clock
        # Sessions are signed with a key derived from the token, so that
        # changing the token (and restarting) logs every browser out.
        self._session_key = hmac.new(self._token, b"scs admin session", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: str) -> TokenAuth:
        return cls(read_token_file(path))

    def check_token(self, candidate: str | bytes) -> bool:
        if isinstance(candidate, str):
            try:
                candidate = candidate.encode("ascii")
            except UnicodeEncodeError:
                return False
        return hmac.compare_digest(candidate, self._token)

    def check_bearer(self, request: IRequest) -> bool:
        """``Authorization: Bearer <token>``."""
        scheme, _, value = _authorization(request)
        return scheme == b"bearer" and self.check_token(value.strip())

    def check_basic(self, request: IRequest) -> bool:
        """HTTP basic auth with the token as password (user name ignored)."""
        scheme, _, value = _authorization(request)
        if scheme != b"basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        _user, sep, password = decoded.partition(b":")
        return bool(sep) and self.check_token(password)

    # -- admin sessions ------------------------------------------------

    def new_session(self) -> bytes:
        """A cookie value: expiry time and its signature."""
        expires = str(int(self._clock() + SESSION_LIFETIME)).encode()
        return expires + b"." + self._sign(expires)

    def check_session(self, value: bytes | None) -> bool:
        if not value:
            return False
        expires, sep, signature = value.partition(b".")
        if not sep or not expires.isdigit():
            return False
        if not hmac.compare_digest(signature, self._sign(expires)):
            return False
        return int(expires) > self._clock()

    def _sign(self, message: bytes) -> bytes:
        return hmac.new(self._session_key, message, hashlib.sha256).hexdigest().encode()

    def check_admin(self, request: IRequest) -> bool:
        """Any of the admin page's ways in: bearer, basic or session cookie."""
        return (
            self.check_bearer(request)
            or self.check_basic(request)
            or self.check_session(request.getCookie(SESSION_COOKIE))
        )


def _authorization(request: IRequest) -> tuple[bytes, bytes, bytes]:
    header = request.getHeader(b"authorization") or b""
    scheme, sep, value = header.strip().partition(b" ")
    return scheme.lower(), sep, value


def write_unauthorized(request: IRequest) -> bytes:
    request.setResponseCode(401)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"WWW-Authenticate", b'Bearer realm="scs-agent"')
    return json.dumps({"error": "missing or wrong bearer token"}).encode()


class TokenGuard(Resource):
    """Answers 401 for any request outside ``/admin/`` without the token;
    hands the others to ``wrapped`` (a leaf resource, as the API is)."""

    isLeaf = True

    def __init__(self, wrapped: IResource, auth: TokenAuth) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.auth = auth

    def render(self, request: IRequest) -> bytes | int:
        if not _is_admin(request.path) and not self.auth.check_bearer(request):
            log.info(
                "refused {method} {path}: no valid bearer token",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1")[:200],
                event="http.unauthorized",
            )
            return write_unauthorized(request)
        return self.wrapped.render(request)


def _is_admin(path: bytes) -> bool:
    # Decide on the first segment as twisted.web routes it (unquoted), so
    # that "/%61dmin/" cannot be routed to the admin page but checked as
    # something else, or the other way round.
    segments = path.split(b"/")
    return len(segments) > 1 and unquote_to_bytes(segments[1]) == ADMIN_PREFIX[1:]


def guarded(resource: IResource, auth: TokenAuth | None) -> IResource:
    """``resource`` behind the token check, or as it is without a token."""
    if auth is None:
        return resource
    return TokenGuard(resource, auth)
