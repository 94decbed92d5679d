"""The API's pure guards without a server: token files and scope decisions, the route -> scope
table of the real app, limits from flags/env, strict JSON decoding (hypothesis), strict request
models, bounded settings and the store's own row validation."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from index_runtime.cli import load_tokens
from index_runtime.contract import Env, Scope
from index_runtime.errors import (
    ForbiddenError,
    InvalidInputError,
    UnauthorizedError,
)
from index_runtime.index.settings import MAX_ROWS, MAX_SECONDS, MAX_WINDOW, IndexSettings
from index_runtime.service.app import CreateIndex, SearchQuery, Upsert, create_app
from index_runtime.service.auth import TokenSet, authorize, parse_tokens_file, route_scope
from index_runtime.service.engine import Engine, ServeConfig, check_name
from index_runtime.service.inputs import decode_json
from index_runtime.service.limits import ApiLimits
from index_runtime.service.metrics import Metrics
from index_runtime.store.rows import Limits, validate_upsert

ADMIN_T, WRITE_T, READ_T, MIRROR_T = (f"{s}-token-0123456789" for s in ("admin", "write", "read", "mirror"))


def _hash(t: str) -> str:
    return "sha256:" + hashlib.sha256(t.encode()).hexdigest()


TOKENS_TEXT = f"""
# the runtime accepts these (a mounted Secret)
admin {_hash(ADMIN_T)}
write {_hash(WRITE_T).upper().replace("SHA256", "sha256")}
read {READ_T}
mirror {_hash(MIRROR_T)}
"""


@pytest.mark.parametrize(
    ("token", "needed", "outcome"),
    [
        (ADMIN_T, Scope.ADMIN, None),
        (ADMIN_T, Scope.MIRROR, None),
        (WRITE_T, Scope.WRITE, None),
        (WRITE_T, Scope.READ, None),
        (WRITE_T, Scope.ADMIN, ForbiddenError),
        (WRITE_T, Scope.MIRROR, ForbiddenError),
        (READ_T, Scope.READ, None),
        (READ_T, Scope.WRITE, ForbiddenError),
        (MIRROR_T, Scope.MIRROR, None),
        (MIRROR_T, Scope.READ, ForbiddenError),
        ("an-unknown-token-0000", Scope.READ, UnauthorizedError),
        (None, Scope.READ, UnauthorizedError),
        (None, None, None),  # open routes
    ],
)
def test_scope_decisions(token: str | None, needed: Scope | None, outcome: type[Exception] | None) -> None:
    tokens = parse_tokens_file(TOKENS_TEXT)
    header = f"Bearer {token}" if token else None
    if outcome is None:
        authorize(tokens, header, needed)
    else:
        with pytest.raises(outcome):
            authorize(tokens, header, needed)


def test_no_tokens_is_open_and_bad_headers_are_401() -> None:
    authorize(TokenSet(), None, Scope.ADMIN)
    tokens = TokenSet.of({ADMIN_T: Scope.ADMIN})
    for header in (f"Basic {ADMIN_T}", "Bearer", f"Bearer  {ADMIN_T[:-1]}", ""):
        with pytest.raises(UnauthorizedError):
            authorize(tokens, header, Scope.READ)
    authorize(tokens, f"bearer   {ADMIN_T} ", Scope.READ)


@pytest.mark.parametrize(
    "text",
    ["superuser " + "x" * 20, "read", "read sha256:abc", "read short", "read a b"],
)
def test_bad_token_lines_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        parse_tokens_file(text, "f")
    assert "line 1" in str(exc.value) and "x" * 20 not in str(exc.value)


def test_only_digests_are_kept() -> None:
    tokens = parse_tokens_file(TOKENS_TEXT)
    assert READ_T.encode() not in repr(tokens).encode()
    assert tokens.scopes_of(READ_T) == {Scope.READ}


def test_tokens_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"read {READ_T}\n")
    env = {Env.TOKENS_FILE: str(f), Env.ADMIN_TOKEN: ADMIN_T}
    plain, path, tokens = load_tokens(None, False, env)
    assert tokens.scopes_of(READ_T) == {Scope.READ} and tokens.scopes_of(ADMIN_T) == {Scope.ADMIN}
    assert path == f and plain.scopes_of(READ_T) == set()
    assert load_tokens(None, False, {})[2].open
    with pytest.raises(InvalidInputError):
        load_tokens(str(tmp_path / "missing"), False, {})


# every route of the real app, with the scope it must need: a new route fails here until
# it is listed, so nothing becomes open (or admin-only) by accident
EXPECTED = {
    ("GET", "/v1/indexes"): Scope.READ,
    ("POST", "/v1/indexes"): Scope.WRITE,
    ("GET", "/v1/indexes/{name}"): Scope.READ,
    ("DELETE", "/v1/indexes/{name}"): Scope.WRITE,
    ("POST", "/v1/indexes/{name}/upsert"): Scope.WRITE,
    ("POST", "/v1/indexes/{name}/delete"): Scope.WRITE,
    ("POST", "/v1/indexes/{name}/fetch"): Scope.READ,
    ("GET", "/v1/indexes/{name}/count"): Scope.READ,
    ("GET", "/v1/indexes/{name}/scan"): Scope.READ,
    ("POST", "/v1/indexes/{name}/search"): Scope.READ,
    ("POST", "/v1/indexes/{name}/search/batch"): Scope.READ,
    ("POST", "/v1/indexes/{name}/internal/samples"): Scope.MIRROR,
    ("POST", "/v1/indexes/{name}/internal/queries"): Scope.MIRROR,  # reader -> writer (query log)
    ("GET", "/v1/indexes/{name}/status"): Scope.READ,
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
}


def test_the_tokens_file_is_reread_when_it_changes_and_fails_closed(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"read {_hash(READ_T)}\n")
    engine = Engine(ServeConfig(data=tmp_path / "d", tokens_file=f))
    assert engine.tokens().scopes_of(READ_T) == {Scope.READ}
    f.write_text(f"admin {_hash(ADMIN_T)}\n# rotated\n")  # a Secret update
    assert engine.tokens().scopes_of(ADMIN_T) == {Scope.ADMIN}
    assert engine.tokens().scopes_of(READ_T) == set()
    # an edit that revokes a token and adds a typo still revokes it; the typo is reported
    f.write_text(f"admin {_hash(ADMIN_T)}\nread {_hash(READ_T)}\n")
    assert engine.tokens().scopes_of(READ_T) == {Scope.READ}
    f.write_text(f"admin {_hash(ADMIN_T)}\nwirte typo-token-0123456789\n")
    assert engine.tokens().scopes_of(READ_T) == set()
    assert engine.tokens().scopes_of(ADMIN_T) == {Scope.ADMIN}
    assert engine.tokens_problem is not None and "line 2" in engine.tokens_problem
    # emptied, all-invalid or gone: every token is refused, and the server never turns open
    f.write_text(f"read {_hash(READ_T)}\nadmin {_hash(ADMIN_T)}\n")
    assert engine.tokens().scopes_of(READ_T) == {Scope.READ}
    # a revocation saved in another encoding: unreadable, so nothing of the old file survives
    f.write_bytes(f"admin {_hash(ADMIN_T)}\n# rotated by Jos\xe9\n".encode("latin-1"))
    assert engine.tokens().scopes_of(READ_T) == set() and engine.tokens().scopes_of(ADMIN_T) == set()
    assert engine.tokens_problem is not None and "UTF-8" in engine.tokens_problem
    with pytest.raises(InvalidInputError, match="UTF-8"):
        Engine(ServeConfig(data=tmp_path / "d", tokens_file=f))
    for broken in ("", "# rotated\n", "garbage line"):
        f.write_text(broken)
        tokens = engine.tokens()
        assert not tokens.open and tokens.scopes_of(ADMIN_T) == set(), broken
        with pytest.raises(UnauthorizedError):
            authorize(tokens, None, Scope.WRITE)
    f.write_text(f"admin {_hash(ADMIN_T)}\n")
    assert engine.tokens().scopes_of(ADMIN_T) == {Scope.ADMIN} and engine.tokens_problem is None
    f.unlink()
    assert not engine.tokens().open and engine.tokens().scopes_of(ADMIN_T) == set()
    with pytest.raises(InvalidInputError):
        Engine(ServeConfig(data=tmp_path / "d", tokens_file=tmp_path / "missing"))


def test_every_route_of_the_app_has_its_scope(tmp_path: Path) -> None:
    app = create_app(Engine(ServeConfig(data=tmp_path)), Metrics())
    seen = 0
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            got = route_scope(method, route.path)  # type: ignore[attr-defined]
            if "/admin/" in route.path:  # type: ignore[attr-defined]
                assert got is Scope.ADMIN, route.path  # type: ignore[attr-defined]
            elif route.path.startswith("/v1"):  # type: ignore[attr-defined]
                assert (method, route.path) in EXPECTED, f"unlisted route {method} {route.path}"  # type: ignore[attr-defined]
                assert got is EXPECTED[(method, route.path)], (method, route.path)  # type: ignore[attr-defined]
                seen += 1
            else:
                assert got is None
    assert seen == sum(1 for k in EXPECTED if k[1].startswith("/v1"))
    spec = app.openapi()  # what clients (and the fuzzer) read: the scheme and each scope
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (method, path), scope in EXPECTED.items():
        op = spec["paths"][path][method.lower()]
        assert op.get("x-driftless-scope") == (scope.value if scope else None), (method, path)
        assert ("security" in op) == (scope is not None)


def test_limits_from_flags_then_env_then_defaults() -> None:
    env = {"DRIFTLESS_MAX_BODY_BYTES": "1000", "DRIFTLESS_MAX_BATCH_ROWS": "7"}
    lim = ApiLimits.from_env(env, max_batch_rows=9, max_batch_queries=None)
    assert (lim.max_body_bytes, lim.max_batch_rows, lim.max_batch_queries) == (1000, 9, 256)
    for bad in ({"DRIFTLESS_MAX_BODY_BYTES": "lots"}, {"DRIFTLESS_MAX_BODY_BYTES": "0"}):
        with pytest.raises(InvalidInputError):
            ApiLimits.from_env(bad)


def test_names_by_fullmatch() -> None:
    assert check_name("abc-1") == "abc-1"
    for bad in ("abc\n", "-abc", "a" * 64, "Abc", "a_b", ""):
        with pytest.raises(InvalidInputError):
            check_name(bad)


# --- JSON decoding ------------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.lists(st.one_of(st.characters(), SURROGATES), max_size=6).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_decode_json_refuses_exactly_the_bodies_with_lone_surrogates(value: Any) -> None:
    body = json.dumps(value).encode()  # ASCII: surrogates as \\uXXXX escapes
    expected = json.loads(body)  # adjacent high+low escapes join into one valid character
    if _encodable(expected):
        assert decode_json(body) == expected
    else:
        with pytest.raises(InvalidInputError, match="invalid Unicode"):
            decode_json(body)
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if _encodable(value):
        assert decode_json(raw) == value
    else:  # UTF-8-encoded surrogates: refused by the strict decode
        with pytest.raises(InvalidInputError):
            decode_json(raw)


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_decode_json_refuses_non_finite_literals(const: str) -> None:
    with pytest.raises(InvalidInputError, match="finite"):
        decode_json(f'{{"x": [1, {const}]}}'.encode())


# --- strict request models ----------------------------------------------------------------

SCALARS = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.none())


@settings(max_examples=200, deadline=None)
@given(SCALARS)
def test_k_is_a_strict_integer(k: Any) -> None:
    ok = type(k) is int and 1 <= k <= 1000
    try:
        SearchQuery.model_validate({"vector": [1.0], "k": k})
    except ValidationError:
        assert not ok
    else:
        assert ok


@settings(max_examples=200, deadline=None)
@given(st.lists(SCALARS, min_size=1, max_size=4))
def test_keys_are_strict_ints_or_strings(keys: list[Any]) -> None:
    ok = all(type(k) in (int, str) for k in keys)
    try:
        Upsert.model_validate({"keys": keys, "vectors": [[1.0]] * len(keys)})
    except ValidationError:
        assert not ok
    else:
        assert ok


def test_models_refuse_coercion() -> None:
    for bad in ({"vector": ["1.0"]}, {"vector": [True]}, {"vector": [1.0], "include_vector": "yes"}):
        with pytest.raises(ValidationError):
            SearchQuery.model_validate(bad)
    SearchQuery.model_validate({"vector": [1, 2.5]})  # an integer is a valid float
    with pytest.raises(ValidationError):
        CreateIndex.model_validate({"name": "x", "model": "m", "dim": 4.0})


# --- settings -----------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(10**31), max_value=10**31),
    st.floats(),  # includes inf and nan
    st.sampled_from([0, 1, 2, 50, 500, 0.5, 1e15, 1e30, 10**15, 10**30]),
)
FIELDS = {
    "oracle": ["sample_rate", "k", "theta", "delta", "window", "min_samples", "cpu_budget", "queue"],
    "lifecycle": ["tau", "growth_factor", "backoff_s", "backoff_max_s", "compaction_interval_s"],
    "shadow": ["hnsw_m", "ef_search", "regenerate_overhead"],
    "primary": ["nlist", "m", "nbits", "nprobe", "rerank"],
}
SETTINGS = st.fixed_dictionaries(
    {},
    optional={sec: st.dictionaries(st.sampled_from(names), NUMBERS, max_size=3) for sec, names in FIELDS.items()},
)


@settings(max_examples=200, deadline=None)
@given(SETTINGS)
def test_settings_are_finite_and_bounded_or_refused(d: dict[str, Any]) -> None:
    try:
        s = IndexSettings.from_json(d, 64)
    except InvalidInputError:
        return
    for sec in s.to_json().values():
        for v in sec.values():
            assert not isinstance(v, float) or math.isfinite(v)
            assert not isinstance(v, int) or abs(v) <= MAX_ROWS
    assert s.oracle.window <= MAX_WINDOW and s.lifecycle.tau <= MAX_ROWS
    assert s.lifecycle.backoff_max_s <= MAX_SECONDS and s.lifecycle.compaction_interval_s <= MAX_SECONDS


# --- the store's own validation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "texts", "metadata"),
    [
        (["a\ud800"], None, None),
        (["a"], ["t\udfff"], None),
        (["a"], None, [{"\ud800": 1}]),
        (["a"], None, [{"x": [{"y": "\udc00"}]}]),
        (["a"], None, [{"x": "y" * 70_000}]),  # over MAX_METADATA_BYTES
    ],
)
def test_store_validation_refuses_what_it_could_not_answer(keys: list[str], texts: Any, metadata: Any) -> None:
    with pytest.raises(InvalidInputError):
        validate_upsert(keys, {"m": [[1.0]]}, {"m": 1}, ["m"], "str", Limits(), texts, metadata)


def test_store_validation_keeps_valid_unicode() -> None:
    _, _, texts, meta = validate_upsert(
        ["é"], {"m": [[1.0]]}, {"m": 1}, ["m"], "str", Limits(), ["\U0001f600"], [{"ключ": "値"}]
    )
    assert texts == ["\U0001f600"] and meta is not None and json.loads(meta[0] or "") == {"ключ": "値"}
