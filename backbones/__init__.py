"""Backbones behind one protocol (see base.py): `backbones.create("vit", size="small")`."""
from . import vit  # noqa: F401  (registers vit, simple_vit)
from .base import (
    Backbone,
    CapabilityError,
    build_config,
    create,
    list_backbones,
    load,
    load_meta,
    register,
    save,
)

__all__ = ["Backbone", "CapabilityError", "build_config", "create", "list_backbones", "load", "load_meta", "register", "save"]
