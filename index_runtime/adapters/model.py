"""The serving form of an adapter, whatever it was fitted as:

    y = x·M + c  [+ GELU(x·W1 + b1)·W2]        (M dense, or factored M = A·B for low rank)
    y ← y / ‖y‖                               (cosine targets)

Centering, scaling and diagonal scaling are folded into M, c and W2 at fit time, so applying
an adapter is one or two small matrix products in float32 — a few microseconds per query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


def gelu(x: F32) -> F32:
    """GELU, tanh form (the MLP is trained with the same form in torch)."""
    return np.asarray(
        0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x))),
        dtype=np.float32,
    )


@dataclass
class Adapter:
    kind: str  # procrustes | lowrank | mlp | rank (rank serves like procrustes: M, c)
    src_dim: int
    dst_dim: int
    normalize: bool  # cosine target space: outputs re-normalized
    c: F32  # (dst_dim,)
    M: F32 | None = None  # (src_dim, dst_dim)
    A: F32 | None = None  # (src_dim, rank)
    B: F32 | None = None  # (rank, dst_dim)
    W1: F32 | None = None  # (src_dim, hidden)
    b1: F32 | None = None  # (hidden,)
    W2: F32 | None = None  # (hidden, dst_dim)
    diagonal: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.M is None) == (self.A is None or self.B is None):
            raise ValueError("an adapter has either a dense map M or factors A and B")
        if (self.W1 is None) != (self.W2 is None) or (self.W1 is None) != (self.b1 is None):
            raise ValueError("the residual needs W1, b1 and W2 together")

    def apply(self, x: npt.ArrayLike) -> F32:
        """Map (n, src_dim) or (src_dim,) new-model vectors into the old space."""
        v = np.asarray(x, dtype=np.float32)
        single = v.ndim == 1
        v = v.reshape(1, -1) if single else v
        if v.shape[1] != self.src_dim:
            raise ValueError(f"adapter expects dimension {self.src_dim}, got {v.shape[1]}")
        if self.M is not None:
            y = v @ self.M
        else:
            assert self.A is not None and self.B is not None
            y = (v @ self.A) @ self.B
        y += self.c
        if self.W1 is not None:
            assert self.b1 is not None and self.W2 is not None
            y += gelu(v @ self.W1 + self.b1) @ self.W2
        if self.normalize:  # einsum: ~2 µs cheaper than linalg.norm at these sizes (measured)
            n = np.sqrt(np.einsum("ij,ij->i", y, y))
            np.maximum(n, np.float32(1e-12), out=n)
            y /= n[:, None]
        return y[0] if single else y

    def tensors(self) -> dict[str, F32]:
        names = ("c", "M", "A", "B", "W1", "b1", "W2")
        return {
            n: np.ascontiguousarray(getattr(self, n)) for n in names if getattr(self, n) is not None
        }

    def flops(self, batch: int) -> int:
        """Multiply-adds x2 of one apply on ``batch`` rows (for the latency bound)."""
        d, e = self.src_dim, self.dst_dim
        lin = d * e if self.M is not None else (d + e) * self.A.shape[1]  # type: ignore[union-attr]
        mlp = 0 if self.W1 is None else (d + e) * self.W1.shape[1]
        return 2 * batch * (lin + mlp) + 4 * batch * e

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())
