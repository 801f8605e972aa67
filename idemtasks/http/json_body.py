"""JSON bodies, as the request fingerprint reads them.

A client that retries may serialize its body again, and its JSON library owes it no particular key order or
spacing: ``{"amount":500,"account":"a"}`` and ``{"account": "a", "amount": 500}`` are one request. Hashed as bytes,
the retry would answer 422, and a client that then gave up on the key and sent a fresh one would pay twice. So a JSON
body is hashed in a canonical form: object members in name order, no insignificant whitespace, strings in one
spelling (``"\\u00e9"`` is ``"é"``).

Everything that may mean something else stays apart, so that no two different requests become one:

* numbers keep the text the client wrote (``500`` is not ``500.0``, ``0.1`` is not ``0.10000000000000000001``): a
  parser that turned them into floats would make distinct amounts equal;
* a member named twice keeps both values, in their order (parsers disagree on which one wins);
* strings are not Unicode-normalized (two spellings of one name may be two accounts).

A body that does not parse as JSON is hashed as it is; it can never equal a canonical form, which always parses.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json", "is_json"]


def is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is JSON: ``application/json`` or a ``+json`` type (``application/merge-patch+json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _Number(str):
    """A number (or NaN/Infinity) as the client wrote it."""


class _Members(list[tuple[str, Any]]):
    """An object's members in the order the client wrote them, repeats included."""


def canonical_json(body: bytes) -> bytes | None:
    """The canonical form of a JSON ``body`` (see the module's docstring), ``None`` if it is not JSON."""
    try:
        value = json.loads(body, parse_float=_Number, parse_int=_Number, parse_constant=_Number,
                           object_pairs_hook=_Members)
        out: list[str] = []
        _write(value, out)
        return "".join(out).encode()
    # Not JSON, or not in UTF-8/16/32; nested deeper than Python recurses; a lone surrogate ("\ud800"), which has no
    # UTF-8 form: hashed as the bytes the client sent.
    except (ValueError, RecursionError):
        return None


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, _Number):  # before str: a number is kept as written, never quoted
        out.append(value)
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, _Members):
        out.append("{")
        # sorted() is stable: a repeated name keeps its values in their order.
        for i, (name, member) in enumerate(sorted(value, key=lambda pair: pair[0])):
            out.append("," if i else "")
            out.append(json.dumps(name, ensure_ascii=False) + ":")
            _write(member, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _write(item, out)
        out.append("]")
    else:  # True, False, None
        out.append(json.dumps(value))
