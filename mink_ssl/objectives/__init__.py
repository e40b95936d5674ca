"""Pretext objectives: one file each, registered in ``OBJECTIVES`` (see base.py)."""
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives import hardest_contrastive  # noqa: F401  (registers the objective)
from mink_ssl.objectives import cluster_render  # noqa: F401
from mink_ssl.objectives import distillation  # noqa: F401
from mink_ssl.objectives import gmm_likelihood  # noqa: F401
from mink_ssl.objectives import perturbation  # noqa: F401
from mink_ssl.objectives import point_info_nce  # noqa: F401
from mink_ssl.objectives import shape_context_nce  # noqa: F401

__all__ = ["OBJECTIVES", "Objective", "StepContext"]
