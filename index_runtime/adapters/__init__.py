"""Drift adapters: maps from a new embedding model's vectors into an old model's space, so
the old index answers new-model queries while the corpus is re-embedded.

* ``model.py`` — :class:`Adapter`, the serving form: numpy only, batch-aware, never torch.
* ``fit.py`` — orthogonal Procrustes (centered, scaled; closed form), low-rank affine
  (reduced-rank ridge regression; closed form), residual MLP (torch, fixed seed, imported only
  inside the fit), each optionally followed by diagonal scaling.
* ``artifact.py`` — safetensors files with provenance in their metadata.

Importing this package never imports torch.
"""

from index_runtime.adapters.fit import KINDS, FitOptions, fit_adapter
from index_runtime.adapters.model import Adapter

__all__ = ["KINDS", "Adapter", "FitOptions", "fit_adapter"]
