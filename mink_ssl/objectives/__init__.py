"""Pretext objectives: one file each, registered in ``OBJECTIVES`` (see base.py)."""
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.registry import OBJECTIVES

__all__ = ["OBJECTIVES", "Objective", "StepContext"]
