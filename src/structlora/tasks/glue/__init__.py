"""GLUE data loading (hub or local TSV layouts) and metrics (scikit-learn / scipy)."""

from .data import GLUE_TASKS, GlueDataError, GlueTask, load_glue, load_glue_local
from .metrics import compute_glue_metrics, make_compute_metrics

__all__ = [
    "GLUE_TASKS",
    "GlueDataError",
    "GlueTask",
    "compute_glue_metrics",
    "load_glue",
    "load_glue_local",
    "make_compute_metrics",
]
