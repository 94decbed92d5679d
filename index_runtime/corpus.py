"""A real text corpus nobody here wrote: docstrings of Python's standard library.

Each documented function, class or method whose docstring has a summary line and a body of
at least ``min_body`` characters gives one pair: the summary as a query, the body as its
passage. Sources are parsed with ``ast`` (nothing is imported). Passages are normalized,
deduplicated, sorted by their SHA-256 and the corpus is pinned by the SHA-256 of its content.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
}


@dataclass(frozen=True)
class Doc:
    id: str  # sha256 of the passage, hex
    query: str
    passage: str
    source: str  # module path and qualified name


@dataclass(frozen=True)
class Corpus:
    docs: tuple[Doc, ...]
    sha256: str
    source: str

    def head(self, n: int) -> Corpus:
        docs = self.docs[:n]
        return Corpus(docs, corpus_hash(docs), self.source)


def corpus_hash(docs: tuple[Doc, ...]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.query, d.passage], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _split(doc: str) -> tuple[str, str] | None:
    text = inspect.cleandoc(doc)
    parts = text.split("\n\n", 1)
    if len(parts) != 2:
        return None
    summary = " ".join(parts[0].split())
    body = " ".join(parts[1].split())
    return summary, body


def _iter_docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = f"{name}.{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc:
                    yield qual, doc
                stack.append((child, qual))


def _iter_tree(root: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of every documented definition under ``root``, in path
    order, skipping test and vendored directories."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS for p in rel.parts):
            continue
        yield from _iter_docstrings(path, ".".join(rel.with_suffix("").parts))


def build_stdlib_corpus(
    min_body: int = 120, max_passage: int = 600, root: Path | None = None
) -> Corpus:
    """Docstring pairs from the standard library at ``root`` (default: this interpreter's)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, Doc] = {}
    queries: set[str] = set()
    for qual, doc in _iter_tree(root):
        split = _split(doc)
        if split is None:
            continue
        summary, body = split
        if len(body) < min_body or len(summary) < 12 or summary.lower() in queries:
            continue
        passage = body[:max_passage]
        pid = hashlib.sha256(passage.encode()).hexdigest()
        if pid in seen:
            continue
        queries.add(summary.lower())
        seen[pid] = Doc(pid, summary, passage, qual)
    docs = tuple(sorted(seen.values(), key=lambda d: d.id))
    return Corpus(
        docs, corpus_hash(docs), f"python {sysconfig.get_python_version()} stdlib docstrings"
    )


def build_paragraph_corpus(
    min_chars: int = 80, max_chars: int = 500, root: Path | None = None
) -> Corpus:
    """Every docstring paragraph of the standard library (a larger corpus for benchmarks):
    passages only (the query field repeats the source name), deduplicated, pinned by hash."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, Doc] = {}
    for qual, doc in _iter_tree(root):
        for para in inspect.cleandoc(doc).split("\n\n"):
            text = " ".join(para.split())
            if len(text) < min_chars or text.startswith((">>>", "..")):
                continue
            passage = text[:max_chars]
            pid = hashlib.sha256(passage.encode()).hexdigest()
            if pid not in seen:
                seen[pid] = Doc(pid, qual, passage, qual)
    docs = tuple(sorted(seen.values(), key=lambda d: d.id))
    return Corpus(
        docs, corpus_hash(docs), f"python {sysconfig.get_python_version()} stdlib docstring paragraphs"
    )


def build_labelled_corpus(roots: Sequence[Path | None] = (None,)) -> Corpus:
    """Docstring pairs from several source trees (``None`` = the standard library), merged:
    a passage or a query seen in an earlier tree is not repeated. Sorted and pinned by hash."""
    seen: dict[str, Doc] = {}
    queries: set[str] = set()
    names = []
    for root in roots:
        part = build_stdlib_corpus(root=root)
        names.append("stdlib" if root is None else root.name)
        for d in part.docs:
            if d.id not in seen and d.query.lower() not in queries:
                seen[d.id] = d
                queries.add(d.query.lower())
    docs = tuple(sorted(seen.values(), key=lambda d: d.id))
    return Corpus(docs, corpus_hash(docs), f"docstring pairs: {', '.join(names)}")


def site_roots(*packages: str) -> list[Path | None]:
    """The standard library plus the installed source trees of ``packages`` that exist."""
    import numpy

    site = Path(numpy.__file__).parent.parent
    return [None, *(site / p for p in packages if (site / p).exists())]


SPLITS = (("fit", 0.6), ("calibration", 0.2), ("test", 0.2))


def split_of(item_id: str, salt: str = "driftless") -> str:
    """Which disjoint split an item belongs to (fit 60% / calibration 20% / test 20%), from a
    hash of its id: stable across runs, corpus sizes and orderings."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{item_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, share in SPLITS:
        acc += share
        if u < acc:
            return name
    return SPLITS[-1][0]
