"""Forms, as the request fingerprint reads them.

The fingerprint promises that the same request under a key is a replay and any other request is a mismatch, never
a silent replay. Two things about forms would break that promise if the fingerprint read the raw body:

* A multipart body is cut by a boundary that browsers and most HTTP libraries draw at random for every request, so
  a client's retry of the very same form would differ from its first copy. :func:`canonical_body` puts one fixed
  delimiter in its place. A boundary never occurs inside a part (that is what makes it a boundary), so bodies with
  the same parts still compare equal and bodies with other parts still differ.
* A framework parses a form by consuming the request stream, so a view that read its form before submitting leaves
  no raw body behind: Django and Starlette raise, Werkzeug returns nothing, and an empty body would have made every
  form under one key look the same. The adapters then describe the parsed form instead (:func:`parsed_form_body`):
  its fields, and its files by name, file name, type and a digest of their content.

A view reads its form either before submitting or after, the same way on every request, so the retries of one
endpoint are always fingerprinted the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from email.message import Message
from typing import IO

__all__ = ["FORM_BODY", "Upload", "canonical_body", "file_digest", "parsed_form_body", "upload_digest"]

#: Where an adapter keeps a request's stand-in body (on the request, or its ASGI scope), built once per request.
FORM_BODY = "idemtasks.form_body"
#: How the parsed-form description starts, so that it can never be taken for a raw body of the same bytes.
_PARSED = b"idemtasks-parsed-form:"


def canonical_body(body: bytes, content_type: str | None) -> bytes:
    """``body`` with a multipart boundary replaced by a fixed one; any other body as it is."""
    if not content_type or not content_type.lstrip().lower().startswith("multipart/"):
        return body
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or not boundary.isascii():
        return body
    return body.replace(b"--" + boundary.encode(), b"--\x00")


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


def parsed_form_body(fields: Iterable[tuple[str, str]], files: Iterable[Upload]) -> bytes:
    """The stand-in body of a form whose raw body is gone: ``fields`` as (name, value) and ``files`` as (name,
    file name, content type, :func:`file_digest`). Both are put in name order, as a query string is; the values of a
    repeated name keep theirs (the sort is stable)."""
    described = {"fields": sorted(fields, key=lambda f: f[0]), "files": sorted(files, key=lambda f: f[0])}
    return _PARSED + json.dumps(described, ensure_ascii=False, separators=(",", ":")).encode()
