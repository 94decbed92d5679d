"""Bearer tokens with scopes (PURE: parsing and decisions; the app reads files and headers).

A :class:`TokenSet` holds the SHA-256 digests of the tokens a server accepts, each with its
:class:`~index_runtime.contract.Scope`. Tokens come from a file (``Env.TOKENS_FILE``, a mounted
Secret: lines ``<scope> sha256:<hex>`` or ``<scope> <plain token>``, ``#`` comments) and from the
``Env.*_TOKEN`` variables (plain values, one scope each). Plain tokens are hashed on load, so only
digests stay in memory, and a presented token is compared digest to digest with
:func:`hmac.compare_digest` against every entry (no early exit: the time does not depend on
which entry matches, nor on how much of a digest does).

Scopes: ``admin`` covers everything, ``write`` covers ``read``, ``mirror`` covers only itself.
An empty set means open access (the CLI refuses that on a non-loopback address); a server that
was started with tokens never becomes open: a tokens file that turns empty, unreadable or
all-invalid denies everything (``DENY_ALL``) until it is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from index_runtime.contract import Env, Scope
from index_runtime.errors import ForbiddenError, InvalidInputError, UnauthorizedError

_COVERS: dict[Scope, frozenset[Scope]] = {
    Scope.ADMIN: frozenset(Scope),
    Scope.WRITE: frozenset({Scope.WRITE, Scope.READ}),
    Scope.READ: frozenset({Scope.READ}),
    Scope.MIRROR: frozenset({Scope.MIRROR}),
}
ENV_SCOPES = {
    Env.READ_TOKEN: Scope.READ,
    Env.WRITE_TOKEN: Scope.WRITE,
    Env.ADMIN_TOKEN: Scope.ADMIN,
    Env.MIRROR_TOKEN: Scope.MIRROR,
}
_HEX = re.compile(r"[0-9a-f]{64}")
MIN_TOKEN_CHARS = 16  # a shorter token is guessable; refuse it at load time


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def covers(granted: Scope, needed: Scope) -> bool:
    return needed in _COVERS[granted]


@dataclass(frozen=True)
class TokenSet:
    """(sha256 digest, scope) pairs. Empty: no tokens configured (open access)."""

    entries: tuple[tuple[bytes, Scope], ...] = ()

    @property
    def open(self) -> bool:
        return not self.entries

    @staticmethod
    def of(tokens: Mapping[str, Scope | str]) -> TokenSet:
        """From plain tokens (tests, env variables)."""
        return TokenSet(tuple((digest(t), Scope(s)) for t, s in tokens.items()))

    def __add__(self, other: TokenSet) -> TokenSet:
        return TokenSet(self.entries + other.entries)

    def scopes_of(self, token: str) -> set[Scope]:
        """Every scope the token was given (usually one); empty if unknown. Constant time in
        the token's content: every entry is compared."""
        d = digest(token)
        found = set()
        for entry, scope in self.entries:
            if hmac.compare_digest(d, entry):
                found.add(scope)
        return found


def parse_tokens_lines(text: str, source: str = "tokens file") -> tuple[TokenSet, list[str]]:
    """Parse ``<scope> sha256:<hex>`` / ``<scope> <token>`` lines: (the valid entries, one error
    per bad line naming it, never echoing a token). A reload applies the valid lines, so an
    edit that revokes a token and adds a typo still revokes it."""
    out: list[tuple[bytes, Scope]] = []
    errors: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source} line {n}"
        if len(parts) != 2 or parts[0] not in {s.value for s in Scope}:
            errors.append(
                f"{where}: expected '<scope> sha256:<hex>' or '<scope> <token>' "
                f"with a scope of {[s.value for s in Scope]}"
            )
            continue
        scope, value = Scope(parts[0]), parts[1]
        if value.startswith("sha256:"):
            hexd = value.removeprefix("sha256:").lower()
            if not _HEX.fullmatch(hexd):
                errors.append(f"{where}: sha256: needs 64 hex digits")
                continue
            out.append((bytes.fromhex(hexd), scope))
        elif len(value) < MIN_TOKEN_CHARS:
            errors.append(f"{where}: tokens need at least {MIN_TOKEN_CHARS} characters")
        else:
            out.append((digest(value), scope))
    return TokenSet(tuple(out)), errors


def parse_tokens_file(text: str, source: str = "tokens file") -> TokenSet:
    """Strict form (start-up): any bad line is a 400-class error naming it."""
    tokens, errors = parse_tokens_lines(text, source)
    if errors:
        raise InvalidInputError(errors[0])
    return tokens


DENY_ALL = TokenSet(((b"\0" * 32, Scope.READ),))  # no token hashes to this: nothing is allowed


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidInputError(f"{where}: tokens need at least {MIN_TOKEN_CHARS} characters")
    return token


def tokens_from_env(env: Mapping[str, str]) -> TokenSet:
    """The plain ``Env.{READ,WRITE,ADMIN,MIRROR}_TOKEN`` values that are set."""
    pairs = [(_checked(env[name], name), scope) for name, scope in ENV_SCOPES.items() if env.get(name)]
    return TokenSet(tuple((digest(t), s) for t, s in pairs))


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when absent/other)."""
    if not header:
        return None
    kind, _, value = header.strip().partition(" ")
    if kind.lower() != "bearer":
        return None
    return value.strip() or None


def authorize(tokens: TokenSet, header: str | None, needed: Scope | None) -> None:
    """Allow, or raise 401 (no or unknown token) / 403 (a known token without the scope).
    ``needed`` None: an open route (health, metrics)."""
    if needed is None or tokens.open:
        return
    token = bearer(header)
    if token is None:
        raise UnauthorizedError(f"this call needs 'Authorization: Bearer <token>' ({needed} scope)")
    scopes = tokens.scopes_of(token)
    if not scopes:
        raise UnauthorizedError("unknown token")
    if not any(covers(s, needed) for s in scopes):
        raise ForbiddenError(f"the token's scope ({', '.join(sorted(scopes))}) does not cover {needed}")


READ_POSTS = ("/search", "/search/batch", "/fetch")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


def route_scope(method: str, path: str) -> Scope | None:
    """The scope a route needs, from its method and path TEMPLATE (``/v1/indexes/{name}/...``).
    Default-deny: anything under /v1 not listed as read or mirror needs write, and every
    ``admin/`` route needs admin, so routes added later are never open by accident."""
    if path in OPEN_PATHS or not path.startswith("/v1/"):
        return None
    if "/admin/" in path or path.endswith("/admin"):
        return Scope.ADMIN
    if path.endswith(("/internal/samples", "/internal/queries")):  # reader -> shadow / writer
        return Scope.MIRROR
    if method in ("GET", "HEAD") or (method == "POST" and path.endswith(READ_POSTS)):
        return Scope.READ
    return Scope.WRITE
