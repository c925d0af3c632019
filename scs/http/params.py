"""Reading an HTTP request's parameters: query string, form fields or a
JSON object body, all into one flat dict.

Refuses, with ``BadParameter``/``BodyTooLarge``, anything it cannot read
without guessing: bytes that are not UTF-8, a body that is not a JSON
object, a parameter given twice (also as a repeated key of a JSON object),
NaN or Infinity, JSON nested too deep to read, a body over the size limit.

Form clients (HTML forms, ``curl -d``) cannot send "no value": a query or
form field that is empty (``max=``) means "not given", so the route uses its
default or leaves the setting unchanged (``scs.validation.only`` drops it
once it has checked the names).  A bare flag with no ``=`` at all
(``?nowait``) means true for the boolean parameters (``FLAGS``) and "not
given" for the others.  A JSON body says what it means: ``""`` there is a
value, checked like any other.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from twisted.web.iweb import IRequest
from twisted.web.server import Request

from scs.errors import BadParameter, BodyTooLarge
from scs.validation import EmptyField

DEFAULT_MAX_BODY = 64 * 1024

# Boolean parameters that a bare name (``?nowait``) turns on.
FLAGS = frozenset({"nowait", "details", "rolling", "task_events"})


class APIRequest(Request):
    """The request class for the agent's ``Site`` (``requestFactory``).

    twisted.web parses a POST's form or multipart body into ``args`` before
    any resource runs; on a body it cannot parse it answers a bare 400 (no
    JSON), and a malformed Content-Type (``;0*``) makes it raise and drop
    the connection unanswered.  The API and the admin page read bodies
    themselves (``request_params``), so that parsing is switched off.

    It also keeps at most ``max_body + 1`` bytes of a body, in memory: that
    is enough for ``read_body`` to answer 413, and a client sending a huge
    (or endless chunked) body fills neither memory nor a temporary file.
    """

    max_body = DEFAULT_MAX_BODY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        room = self.max_body + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter(f"{where} is not valid UTF-8") from None


def _pairs(raw: bytes, where: str) -> list[tuple[str, str]]:
    """The ``name=value`` fields of a query string or form body, without the
    empty ones (see the module docstring)."""
    text = _decode(raw, where)
    pairs = []
    for field in text.split("&"):
        if not field:
            continue
        name, equals, value = field.partition("=")
        try:
            name = unquote_plus(name, errors="strict")
            value = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise BadParameter(f"{where} holds percent-escapes that are not valid UTF-8") from None
        if value == "":
            # Not given; kept as EmptyField so that ``only`` still names an
            # unknown parameter before dropping it.
            value = "1" if name in FLAGS and not equals else EmptyField()
        pairs.append((name, value))
    return pairs


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice (``json`` keeps the last)."""
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise BadParameter(f"parameter {name!r} is given twice", parameter=name)
        document[name] = value
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """A JSON document, as strict as RFC 8259."""
    text = _decode(body, "body")
    try:
        return json.loads(text, object_pairs_hook=_object_without_repeats, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadParameter("body is not valid JSON: nested too deep") from None
    except ValueError as e:
        raise BadParameter(f"body is not valid JSON: {e}") from None


def read_body(request: IRequest, max_body: int) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadParameter("Content-Length is not a number") from None
        if declared > max_body:
            raise BodyTooLarge(f"body is larger than {max_body} bytes", limit=max_body)
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body = content.read(max_body + 1)
    if len(body) > max_body:
        raise BodyTooLarge(f"body is larger than {max_body} bytes", limit=max_body)
    return body


def request_params(request: IRequest, max_body: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    """All parameters of ``request`` as one dict of name to value."""
    params: dict[str, Any] = {}

    def add(name: str, value: Any) -> None:
        if name in params:
            raise BadParameter(f"parameter {name!r} is given twice", parameter=name)
        params[name] = value

    for name, value in _pairs(urlsplit(request.uri).query, "query string"):
        add(name, value)

    body = read_body(request, max_body)
    if not body.strip():
        return params
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    # curl -d '{...}' labels JSON as a form; a form never starts with "{".
    looks_like_json = body.lstrip()[:1] == b"{"
    if content_type == b"application/json" or (
        looks_like_json and content_type in (b"", b"application/x-www-form-urlencoded")
    ):
        document = parse_json(body)
        if not isinstance(document, dict):
            raise BadParameter("a JSON body must be an object of parameters")
        for name, value in document.items():
            add(name, value)
    elif content_type in (b"", b"application/x-www-form-urlencoded", b"text/plain"):
        for name, value in _pairs(body, "body"):
            add(name, value)
    else:
        raise BadParameter(
            f"unsupported Content-Type {content_type.decode('latin-1')!r}: "
            "send a query string, form fields or a JSON object"
        )
    return params
