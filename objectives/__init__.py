"""Objectives, each one file, registered by name: `objectives.create("mae", backbone, mask_ratio=0.75)`.

Every module of this package is imported here, so adding an objective is adding its file."""
import importlib
import pkgutil

from .base import Objective, create, list_objectives, objective_class, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "matrix"):  # matrix is a tool over the registry, not an objective
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Objective", "create", "list_objectives", "objective_class", "register"]
