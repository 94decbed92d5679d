"""Decoding of JSON request bodies (PURE): strict UTF-8, no NaN/Infinity literals, no number
that overflows to infinity (``1e400``), no lone surrogates anywhere (keys and values at any
depth); and vectors as float32 within its range (``1e39`` is a 400, not an infinity).

Python's ``json.loads`` accepts all three: it decodes bytes with ``surrogatepass`` (so
UTF-8-encoded surrogates get in), turns ``"\\ud800"`` escapes into lone surrogates, and parses
``NaN``/``Infinity``. A lone surrogate stored in a row fails later, when the answer is encoded
as UTF-8 (a 500 on every fetch, scan and search with payload of that row). So bodies are
refused here, with the JSON path of the first bad string, before anything is validated or
stored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.errors import InvalidInputError
from index_runtime.store.rows import valid_unicode

# an escape of a UTF-16 surrogate code unit: only then can json.loads produce a lone one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _no_constants(name: str) -> Any:
    raise InvalidInputError(f"JSON {name} is not allowed (numbers must be finite)")


# Number literals that may overflow a double, found without parsing: the body's bytes mapped to
# classes ('d' a digit, 'e' an exponent mark, '+' dropped, anything else a space). A float
# literal whose integer part has < 200 digits and whose exponent has < 3 digits is below
# 1e298 (finite), so only a body holding "eddd" or a run of 200 digits can hold an overflow;
# only such a body (rare; strings may match too) is parsed with the checking parse_float,
# which costs ~60% more on a body of vectors than the C parser's own float().
_CLASSES = bytes(
    ord("d") if 48 <= b <= 57 else ord("e") if chr(b) in "eE" else ord(" ") for b in range(256)
)
_LONG_DIGITS = b"d" * 200


def _may_overflow(body: bytes) -> bool:
    classes = body.translate(_CLASSES, b"+")
    return b"eddd" in classes or _LONG_DIGITS in classes


def decode_json(body: bytes) -> Any:
    """Parse a request body. Raises :class:`InvalidInputError` (400) for invalid UTF-8,
    NaN/Infinity, numbers out of the range of a double and lone surrogates;
    :class:`json.JSONDecodeError` for malformed JSON."""
    try:
        text = body.decode("utf-8")  # strict: refuses encoded surrogates and bad bytes
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the body is not valid UTF-8 (byte {exc.start})") from None
    if _may_overflow(body):
        overflowed: list[str] = []

        def finite_float(literal: str) -> float:
            v = float(literal)
            if not math.isfinite(v):
                overflowed.append(literal)
            return v

        value = json.loads(text, parse_constant=_no_constants, parse_float=finite_float)
        if overflowed:
            lit = overflowed[0] if len(overflowed[0]) <= 40 else overflowed[0][:37] + "..."
            at = first_non_finite(value) or "body"
            raise InvalidInputError(
                f"{at}: the number {lit} is out of range (numbers must be finite, "
                "|x| < 1.8e308)"
            )
    else:
        value = json.loads(text, parse_constant=_no_constants)
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the parsed value
        where = first_invalid_string(value)
        if where is not None:
            raise InvalidInputError(f"{where}: invalid Unicode (a lone surrogate escape)")
    return value


def first_non_finite(value: Any, root: str = "body") -> str | None:
    """The path of the first float that is not finite, or None (iterative, like
    :func:`first_invalid_string`)."""
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return path
        elif isinstance(v, dict):
            stack.extend((f"{path}.{k}", x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_array(values: Any, field: str) -> npt.NDArray[np.float32]:
    """``values`` (a vector, or rows of vectors, of finite numbers) as float32. A value beyond
    the float32 range (|x| > 3.4e38, e.g. ``1e39``) is a 400 naming ``field`` and the
    position, not an infinity (and not numpy's "overflow encountered in cast" warning).
    Ragged rows raise ValueError, as ``np.asarray`` does."""
    with np.errstate(over="ignore"):
        arr = np.asarray(values, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        at = np.unravel_index(int(np.flatnonzero(bad)[0]), arr.shape)
        item: Any = values
        for i in at:
            item = item[int(i)]
        where = field + "".join(f"[{int(i)}]" for i in at)
        raise InvalidInputError(
            f"{where}: {item!r} is out of the float32 range of vectors (|x| <= {FLOAT32_MAX:.4g})"
        )
    return arr


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
