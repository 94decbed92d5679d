"""Index settings: primary, shadow, oracle and lifecycle parameters (pure, validated).

Stored as JSON in the manifest (``Manifest.settings``); parsed here at the boundary so the rest
of the code sees typed, range-checked values. Every number is finite (NaN/Infinity refused) and
bounded; ranges (also in each ``validate``'s message):

- primary: nlist 'auto' or 1..2^20, m 0 (auto) or a divisor of dim, nbits 1..16,
  nprobe 1..65536, rerank 1..100
- shadow: hnsw_m 4..128, ef_search 1..4096, regenerate_overhead (0, 1]
- oracle: sample_rate [0, 1], k 1..1000, theta (0, 1], delta [0, theta), min_samples
  2..window, window ..100000, cpu_budget (0, 1], queue 1..100000
- lifecycle: tau 0..2^40 rows, growth_factor (1, 1000], 0 <= backoff_s <= backoff_max_s <=
  7 days, compaction_interval_s (0 s, 7 days]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from index_runtime.errors import InvalidInputError

# upper bounds: far above any useful value, low enough that nothing sized by them explodes
MAX_WINDOW = 100_000  # oracle samples kept per codebook (each holds a k-row answer)
MAX_QUEUE = 100_000  # oracle queue entries (each holds a query vector)
MAX_ROWS = 1 << 40  # row counts (lifecycle.tau)
MAX_SECONDS = 7 * 86_400.0  # periods and backoffs: a week


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidInputError(msg)


@dataclass(frozen=True)
class PrimarySettings:
    nlist: int | Literal["auto"] = "auto"
    m: int = 0  # PQ sub-quantizers; must divide the dimension; 0 = auto (about d/8)
    nbits: int = 8  # bits per PQ code
    nprobe: int = 16
    coarse: Literal["flat", "hnsw"] = "flat"  # coarse quantizer
    rerank: int = 4  # candidates fetched per result, re-ranked with exact vectors

    def validate(self, dim: int) -> None:
        _check(
            self.nlist == "auto" or (isinstance(self.nlist, int) and 1 <= self.nlist <= 1 << 20),
            f"primary.nlist must be 'auto' or 1..1048576, got {self.nlist!r}",
        )
        _check(1 <= self.nbits <= 16, f"primary.nbits must be 1..16, got {self.nbits}")
        _check(
            self.m == 0 or (self.m >= 1 and dim % self.m == 0),
            f"primary.m={self.m} must divide dim={dim} (or be 0 for auto)",
        )
        _check(1 <= self.nprobe <= 1 << 16, f"primary.nprobe must be 1..65536, got {self.nprobe}")
        _check(self.coarse in ("flat", "hnsw"), "primary.coarse must be 'flat' or 'hnsw'")
        _check(1 <= self.rerank <= 100, f"primary.rerank must be 1..100, got {self.rerank}")


def auto_m(dim: int) -> int:
    """The largest divisor of ``dim`` that is at most dim/8 (8 dimensions per sub-quantizer
    or more), at least 1."""
    top = max(1, dim // 8)
    return max(m for m in range(1, top + 1) if dim % m == 0)


@dataclass(frozen=True)
class ShadowSettings:
    kind: Literal["flat", "hnsw"] = "flat"
    hnsw_m: int = 32
    ef_search: int = 64
    regenerate_overhead: float = 0.3  # rebuild the HNSW graph when this share of nodes is dead

    def validate(self) -> None:
        _check(self.kind in ("flat", "hnsw"), "shadow.kind must be 'flat' or 'hnsw'")
        _check(4 <= self.hnsw_m <= 128, "shadow.hnsw_m must be 4..128")
        _check(1 <= self.ef_search <= 4096, "shadow.ef_search must be 1..4096")
        _check(0 < self.regenerate_overhead <= 1, "shadow.regenerate_overhead must be in (0, 1]")


@dataclass(frozen=True)
class OracleSettings:
    sample_rate: float = 0.1  # share of queries mirrored to the exact oracle
    k: int = 10  # overlap@k
    theta: float = 0.9  # cutover needs the window's lower bound >= theta
    delta: float = 0.05  # retraining needs the upper bound < theta - delta
    window: int = 500  # samples kept per (index, codebook version)
    min_samples: int = 50  # no decision on fewer samples
    cpu_budget: float = 0.25  # share of one core the oracle may use
    queue: int = 256  # sampled queries waiting; more are dropped (counted)

    def validate(self) -> None:
        _check(0 <= self.sample_rate <= 1, "oracle.sample_rate must be in [0, 1]")
        _check(1 <= self.k <= 1000, "oracle.k must be 1..1000")
        _check(0 < self.theta <= 1, f"oracle.theta must be in (0, 1], got {self.theta}")
        _check(0 <= self.delta < self.theta, "oracle.delta must be >= 0 and < theta")
        _check(2 <= self.min_samples <= MAX_WINDOW, f"oracle.min_samples must be 2..{MAX_WINDOW}")
        _check(
            self.min_samples <= self.window <= MAX_WINDOW,
            f"oracle.window must be min_samples..{MAX_WINDOW}",
        )
        _check(0 < self.cpu_budget <= 1, "oracle.cpu_budget must be in (0, 1]")
        _check(1 <= self.queue <= MAX_QUEUE, f"oracle.queue must be 1..{MAX_QUEUE}")


@dataclass(frozen=True)
class LifecycleSettings:
    tau: int = 0  # live rows before the first training; 0 = the sample size training needs
    growth_factor: float = 4.0  # retrain when live rows >= factor x rows at training
    backoff_s: float = 30.0  # wait after a failed or rejected training, doubled each time
    backoff_max_s: float = 900.0
    compaction_interval_s: float = 60.0  # how often the maintenance loop plans a compaction

    def validate(self) -> None:
        _check(0 <= self.tau <= MAX_ROWS, f"lifecycle.tau must be 0..{MAX_ROWS}")
        _check(1 < self.growth_factor <= 1000, "lifecycle.growth_factor must be in (1, 1000]")
        _check(
            0 <= self.backoff_s <= self.backoff_max_s <= MAX_SECONDS,
            f"need 0 <= backoff_s <= backoff_max_s <= {MAX_SECONDS:.0f} s",
        )
        _check(
            0 < self.compaction_interval_s <= MAX_SECONDS,
            f"lifecycle.compaction_interval_s must be in (0, {MAX_SECONDS:.0f}] s",
        )


@dataclass(frozen=True)
class IndexSettings:
    primary: PrimarySettings = field(default_factory=PrimarySettings)
    shadow: ShadowSettings = field(default_factory=ShadowSettings)
    oracle: OracleSettings = field(default_factory=OracleSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)

    def validate(self, dim: int) -> IndexSettings:
        self.primary.validate(dim)
        self.shadow.validate()
        self.oracle.validate()
        self.lifecycle.validate()
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Any, dim: int) -> IndexSettings:
        """Parse and validate; unknown fields and wrong types are a 400, not a crash."""
        if d is None:
            d = {}
        _check(isinstance(d, dict), "settings must be an object")
        parts: dict[str, Any] = {}
        sections = {f.name for f in fields(IndexSettings)}
        for name in d:
            _check(name in sections, f"unknown settings section {name!r} (use {sorted(sections)})")
        for f in fields(IndexSettings):
            sub = d.get(f.name, {})
            _check(isinstance(sub, dict), f"settings.{f.name} must be an object")
            cls = {"primary": PrimarySettings, "shadow": ShadowSettings}.get(
                f.name, OracleSettings if f.name == "oracle" else LifecycleSettings
            )
            known = {x.name: x for x in fields(cls)}
            for k, v in sub.items():
                _check(k in known, f"unknown setting {f.name}.{k}")
                default = getattr(cls(), k)
                ok = (
                    isinstance(v, type(default))
                    or (isinstance(default, float) and isinstance(v, int))
                    or (k == "nlist" and (v == "auto" or isinstance(v, int)))
                ) and not (isinstance(v, bool) and not isinstance(default, bool))
                _check(ok, f"setting {f.name}.{k} has the wrong type: {v!r}")
                _check(
                    not isinstance(v, float) or math.isfinite(v),
                    f"setting {f.name}.{k} must be a finite number, got {v!r}",
                )
            parts[f.name] = cls(**sub)
        return IndexSettings(**parts).validate(dim)
