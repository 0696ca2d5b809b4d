"""Backbones behind one protocol (see base.py): `backbones.create("vit", size="small")`."""
from . import vit  # noqa: F401  (registers vit, simple_vit)
from .base import (
    Backbone,
    CapabilityError,
    Classifier,
    build_config,
    create,
    list_backbones,
    load,
    load_classifier,
    load_meta,
    register,
    save,
    save_head,
)

__all__ = ["Backbone", "CapabilityError", "Classifier", "build_config", "create", "list_backbones", "load",
           "load_classifier", "load_meta", "register", "save", "save_head"]
