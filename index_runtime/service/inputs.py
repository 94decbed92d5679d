"""Decoding of JSON request bodies (PURE): strict UTF-8, no NaN/Infinity literals, no lone
surrogates anywhere (keys and values at any depth).

Python's ``json.loads`` accepts all three: it decodes bytes with ``surrogatepass`` (so
UTF-8-encoded surrogates get in), turns ``"\\ud800"`` escapes into lone surrogates, and parses
``NaN``/``Infinity``. A lone surrogate stored in a row fails later, when the answer is encoded
as UTF-8 (a 500 on every fetch, scan and search with payload of that row). So bodies are
refused here, with the JSON path of the first bad string, before anything is validated or
stored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from index_runtime.errors import InvalidInputError
from index_runtime.store.rows import valid_unicode

# an escape of a UTF-16 surrogate code unit: only then can json.loads produce a lone one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _no_constants(name: str) -> Any:
    raise InvalidInputError(f"JSON {name} is not allowed (numbers must be finite)")


def decode_json(body: bytes) -> Any:
    """Parse a request body. Raises :class:`InvalidInputError` (400) for invalid UTF-8,
    NaN/Infinity and lone surrogates; :class:`json.JSONDecodeError` for malformed JSON."""
    try:
        text = body.decode("utf-8")  # strict: refuses encoded surrogates and bad bytes
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the body is not valid UTF-8 (byte {exc.start})") from None
    value = json.loads(text, parse_constant=_no_constants)
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the parsed value
        where = first_invalid_string(value)
        if where is not None:
            raise InvalidInputError(f"{where}: invalid Unicode (a lone surrogate escape)")
    return value


def first_invalid_string(value: Any, root: str = "body") -> str | None:
    """The path (``body.metadata[3].<key>``) of the first string or object key that is not
    valid Unicode, or None. Iterative: depth is bounded by the parser, not by our stack."""
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not valid_unicode(v):
                return path
        elif isinstance(v, dict):
            for k, x in v.items():
                if not valid_unicode(k):
                    return f"{path} (an object key)"
                stack.append((f"{path}.{k}", x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v) if isinstance(x, str | list | dict))
    return None
