"""Objectives, each one file, registered by name: `objectives.create("mae", backbone, mask_ratio=0.75)`."""
from . import mae  # noqa: F401  (registers "mae")
from .base import Objective, create, list_objectives, register

__all__ = ["Objective", "create", "list_objectives", "register"]
