"""Forms, as the request fingerprint reads them.

The fingerprint promises that the same request under a key is a replay and any other request is a mismatch, never
a silent replay. Two things about forms would break that promise if the fingerprint read the raw body:

* A multipart body is cut by a boundary that browsers and most HTTP libraries draw at random for every request, so
  a client's retry of the very same form would differ from its first copy. :func:`canonical_body` takes the body
  apart at its delimiter lines and keeps only what lies between them. A delimiter *line* never occurs inside a part
  (RFC 2046), but the boundary's text may (a field ``pay--ab-now`` under boundary ``ab``), so only whole delimiter
  lines are cut: bodies with the same parts still compare equal and bodies with other parts still differ.
* A framework parses a form by consuming the request stream, so a view that read its form before submitting leaves
  no raw body behind: Django and Starlette raise, Werkzeug returns nothing, and an empty body would have made every
  form under one key look the same. The adapters then describe the parsed form instead (:func:`parsed_form_body`):
  its fields, and its files by name, file name, type and a digest of their content. They do so only for a form
  content type (:func:`is_form`) that the framework did parse: any other body read as a stream is gone for good,
  and the adapters raise :func:`body_consumed` rather than fingerprint every payload as the same empty one.

A view reads its form either before submitting or after, the same way on every request, so the retries of one
endpoint are always fingerprinted the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from email.message import Message
from typing import IO

from ..errors import ConfigurationError

__all__ = ["FORM_BODY", "StandIn", "Upload", "body_consumed", "canonical_body", "file_digest", "is_form", "is_stand_in",
           "parsed_form_body", "upload_digest"]

#: Where an adapter keeps a request's stand-in body (on the request, or its ASGI scope), built once per request.
FORM_BODY = "idemtasks.form_body"
#: How the parsed-form description starts, so that it can never be taken for a raw body of the same bytes.
_PARSED = b"idemtasks-parsed-form:"
#: How a multipart body taken apart at its delimiters starts, for the same reason.
_MULTIPART = b"idemtasks-multipart:"
#: The content types a framework parses into a form (and whose stream it consumes doing so).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def is_form(content_type: str | None) -> bool:
    """Whether ``content_type`` is one a framework parses into a form."""
    return (content_type or "").split(";", 1)[0].strip().lower() in FORM_TYPES


def body_consumed(how: str) -> ConfigurationError:
    """The error of a view that read its body as a stream before submitting: nothing is left to fingerprint, and an
    empty body would make every payload under a key a replay of the first. A programming error, so it is raised (a
    500 from the framework) rather than answered."""
    return ConfigurationError(f"the request body was read as a stream before submit()/check(), so it cannot be "
                              f"fingerprinted: read the body after submit()/check(), or through {how}")


def canonical_body(body: bytes, content_type: str | None) -> bytes:
    """A multipart ``body`` without its boundary: the pieces between its delimiter lines; any other body as it is."""
    if not content_type or not content_type.lstrip().lower().startswith("multipart/"):
        return body
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or not boundary.isascii():
        return body
    # A delimiter (RFC 2046) starts the body or a line, and is followed by "--" (the last one) or by optional
    # whitespace and a line break: "pay--ab-now" inside a value is not one. The CRLF before it stays with the piece
    # it ends, so a body that starts with a delimiter and one that starts with a line break do not look alike.
    delimiter = re.compile(rb"(?:\A|(?<=\r\n))--" + re.escape(boundary.encode()) + rb"(?=--|[ \t]*\r\n)")
    pieces = delimiter.split(body)
    # Each piece prefixed by its length: no piece can pass for a delimiter, whatever bytes (a NUL, a marker) it holds.
    return _MULTIPART + b"".join(len(piece).to_bytes(8, "big") + piece for piece in pieces)


def file_digest(chunks: Iterable[bytes]) -> str:
    """A digest of an uploaded file's content, read in ``chunks``."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def upload_digest(file: IO[bytes]) -> str:
    """:func:`file_digest` of a seekable upload, which is left where the view left it."""
    position = file.tell()
    file.seek(0)
    try:
        return file_digest(iter(lambda: file.read(65536), b""))
    finally:
        file.seek(position)


#: An uploaded file as the fingerprint sees it: field name, file name, content type, :func:`file_digest`.
Upload = tuple[str, "str | None", "str | None", str]


class StandIn(bytes):
    """A parsed form's stand-in body (:func:`parsed_form_body`), whose length says nothing of the request's: JSON
    escapes a control character in six bytes, a quote in two. A type of its own rather than its leading bytes, which
    a client could send in a raw body to go unmeasured."""


def is_stand_in(body: bytes) -> bool:
    """Whether ``body`` is a parsed form's stand-in (see :class:`StandIn`)."""
    return isinstance(body, StandIn)


def parsed_form_body(fields: Iterable[tuple[str, str]], files: Iterable[Upload]) -> bytes:
    """The stand-in body of a form whose raw body is gone: ``fields`` as (name, value) and ``files`` as (name,
    file name, content type, :func:`file_digest`). Both are put in name order, as a query string is; the values of a
    repeated name keep theirs (the sort is stable)."""
    described = {"fields": sorted(fields, key=lambda f: f[0]), "files": sorted(files, key=lambda f: f[0])}
    return StandIn(_PARSED + json.dumps(described, ensure_ascii=False, separators=(",", ":")).encode())
