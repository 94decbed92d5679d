"""Measuring a primary against the exact oracle: overlap@k, rank correlation, distortion,
windows with confidence bounds (pure), and the oracle worker (:mod:`.oracle`)."""
