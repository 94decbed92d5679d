"""Training the primary (IVF-PQ) and encoding segments with it.

:func:`plan_training` is pure: how many lists, how large a sample, whether training is possible
at all. The FAISS calls (:func:`train_codebook`, :func:`encode_segment_index`) are the only
places a codebook is made or used to encode rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

from index_runtime.errors import InvalidInputError
from index_runtime.index.settings import PrimarySettings, auto_m

SAMPLES_PER_CENTROID = 39  # FAISS warns below this many training points per centroid


def faiss_metric(metric: str) -> int:
    """cosine (vectors normalized) and ip use inner product; l2 uses squared L2."""
    return int(faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


@dataclass(frozen=True)
class TrainingPlan:
    nlist: int
    m: int
    nbits: int
    sample_rows: int


def auto_nlist(live_rows: int, nbits: int) -> int:
    """About 4·√n lists (a power of two), as many as the sample rule allows, at least 1."""
    target = 1 << max(0, int(math.log2(max(1.0, 4 * math.sqrt(live_rows)))))
    most = max(1, live_rows // SAMPLES_PER_CENTROID)
    return max(1, min(target, most))


def required_rows(p: PrimarySettings) -> int:
    """Live rows needed before training can start (39 × max(nlist, 2^nbits))."""
    nlist = 1 if p.nlist == "auto" else p.nlist
    return SAMPLES_PER_CENTROID * max(nlist, 1 << p.nbits)


def plan_training(live_rows: int, dim: int, p: PrimarySettings) -> TrainingPlan:
    """The codebook shape for ``live_rows`` rows; raises InvalidInputError if too few rows."""
    p.validate(dim)
    need = required_rows(p)
    if live_rows < need:
        raise InvalidInputError(
            f"training needs at least {need} live rows (39 x max(nlist, 2^nbits)); "
            f"the index has {live_rows}"
        )
    nlist = auto_nlist(live_rows, p.nbits) if p.nlist == "auto" else p.nlist
    sample = min(live_rows, max(SAMPLES_PER_CENTROID * max(nlist, 1 << p.nbits), 256 * nlist))
    return TrainingPlan(nlist, p.m or auto_m(dim), p.nbits, sample)


def new_ivfpq(dim: int, metric: str, plan: TrainingPlan, coarse: str) -> faiss.IndexIVFPQ:
    mt = faiss_metric(metric)
    quantizer = faiss.IndexHNSWFlat(dim, 32, mt) if coarse == "hnsw" else faiss.IndexFlat(dim, mt)
    index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.m, plan.nbits, mt)
    index.own_fields = True
    quantizer.this.disown()  # type: ignore[union-attr]  # the IVF index owns it now
    return index


def train_codebook(
    sample: npt.NDArray[np.float32], metric: str, plan: TrainingPlan, coarse: str, seed: int = 0
) -> bytes:
    """Train an empty IVF-PQ on ``sample`` (already normalized for cosine); its bytes."""
    index = new_ivfpq(sample.shape[1], metric, plan, coarse)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return bytes(faiss.serialize_index(index))


def load_index(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def encode_segment_index(
    codebook: bytes, vectors: npt.NDArray[np.float32], seqs: npt.NDArray[np.int64]
) -> bytes:
    """One segment's rows encoded with ``codebook``; FAISS ids are the rows' seqs."""
    index = load_index(codebook)
    if len(seqs):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), seqs)
    return bytes(faiss.serialize_index(index))


def sample_rows(n: int, size: int, seed: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
