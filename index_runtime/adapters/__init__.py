"""Drift adapters: maps from a new embedding model's vectors into an old model's space, so
the old index answers new-model queries while the corpus is re-embedded.

* ``model.py`` — :class:`Adapter`, the serving form: numpy only, batch-aware, never torch.
* ``fit.py`` — orthogonal Procrustes (centered, scaled; closed form), low-rank affine
  (reduced-rank ridge regression; closed form), residual MLP (torch, fixed seed, imported only
  inside the fit), ranking-distilled linear map (``rank.py``: torch, listwise loss from the
  Procrustes start), each optionally followed by diagonal scaling.
* ``artifact.py`` — safetensors files with provenance in their metadata.

Importing this package never imports torch.
"""

from index_runtime.adapters.fit import DEFAULT_KINDS, KINDS, FitOptions, fit_adapter
from index_runtime.adapters.model import Adapter

__all__ = ["DEFAULT_KINDS", "KINDS", "Adapter", "FitOptions", "fit_adapter"]
