"""Backbones behind one protocol (see base.py): `backbones.create("vit", size="small")`.

Every module in this package other than the infrastructure (base, layers, video, convert,
import_vit_pytorch, timm_backbone, and names starting with "_") is a family file that registers its builders when imported; they are all
imported here, so `backbones.create` knows every family.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import (
    Backbone,
    CapabilityError,
    Classifier,
    build_config,
    create,
    example_config,
    list_backbones,
    load,
    load_classifier,
    load_meta,
    read_state_dict,
    register,
    save,
    save_head,
)

_INFRASTRUCTURE = {"base", "layers", "convert", "import_vit_pytorch", "timm_backbone", "timm_export", "video"}
for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Backbone", "CapabilityError", "Classifier", "build_config", "create", "example_config", "list_backbones",
           "load", "load_classifier", "load_meta", "read_state_dict", "register", "save", "save_head"]
