"""The tokens a server accepts, as it runs: the plain tokens it was started with plus the
tokens file's, re-read when the file changes (a Secret update swaps it). Shared by ``serve``
(the engine) and ``route`` (the shards' router), so both fronts accept exactly the same tokens."""

from __future__ import annotations

import logging
from pathlib import Path

from index_runtime.errors import InvalidInputError
from index_runtime.service.auth import DENY_ALL, TokenSet, parse_tokens_file, parse_tokens_lines

log = logging.getLogger(__name__)


def read_tokens_text(path: Path) -> str:
    """The tokens file's text; OSError also when it is not UTF-8 (a token file is ASCII)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


class TokenSource:
    """``plain`` tokens plus those of ``path`` (None: no file). At construction a bad file is
    refused outright (a clear error, exit 2); afterwards :meth:`tokens` fails closed."""

    def __init__(self, plain: TokenSet, path: Path | None) -> None:
        self.plain = plain
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._file = DENY_ALL  # until the file was read once
        self.problem: str | None = None  # why the tokens file is not (fully) applied
        if path is not None:
            try:
                parse_tokens_file(read_tokens_text(path), str(path))
            except OSError as exc:
                raise InvalidInputError(f"cannot read the tokens file {path}: {exc}") from exc
            self.tokens()

    def tokens(self) -> TokenSet:
        """The accepted tokens: the plain ones plus the tokens file's, re-read when its stat
        changes. It fails closed: bad lines are skipped (and logged), and a file that is
        missing, unreadable, not UTF-8 or has no valid line denies every token it would have
        held, so a broken rotation can lock clients out but never open the server or keep a
        revoked token. No plain tokens and no file: open access."""
        path = self.path
        if path is None:
            return self.plain
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != self._key:
                tokens, errors = parse_tokens_lines(read_tokens_text(path), str(path))
                self._file = tokens if tokens.entries else DENY_ALL
                if not tokens.entries:
                    errors.append(f"{path}: no valid token line: every token is refused")
                self.problem = "; ".join(errors) or None
                for e in errors:
                    log.error("tokens file: %s", e)
                self._key = key  # reported once per change, not per request
        except OSError as exc:
            if self._file is not DENY_ALL:
                log.error("tokens file unreadable, every token is refused: %s", exc)
            self._file = DENY_ALL
            self.problem = f"tokens file unreadable: {exc}"
            self._key = None
        return self.plain + self._file
