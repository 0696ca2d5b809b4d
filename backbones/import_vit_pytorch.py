"""Bring a vit-pytorch checkpoint into vit-ssl: a backbone + head folder that backbones.load and
backbones.load_classifier read (and that scores, exports and teaches like any other).

    python -m backbones.import_vit_pytorch FAMILY CHECKPOINT --kwargs '{"image_size": 224, ...}' --out DIR

CHECKPOINT is the model's state dict (torch.save(model.state_dict(), ...); read with
weights_only=True, so nothing in it is executed) or a .safetensors file; --kwargs are the keyword
arguments the vit-pytorch model was built with (vit-pytorch saves none).
"""
from __future__ import annotations

from pathlib import Path

from .base import read_state_dict, save, save_head
from .convert import from_vit_pytorch, vit_pytorch_families


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Convert a vit-pytorch state dict into a vit-ssl backbone + head folder.")
    ap.add_argument("family", help=f"one of: {', '.join(vit_pytorch_families())}")
    ap.add_argument("checkpoint", help="a vit-pytorch state dict (.pt / .pth, read with weights_only=True, or .safetensors)")
    ap.add_argument("--kwargs", required=True, help="the vit-pytorch constructor's keyword arguments, as JSON")
    ap.add_argument("--out", required=True, help="folder to write backbone.safetensors, backbone.json, head.safetensors")
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--kwargs is not JSON ({e}): write it like '{{\"image_size\": 224, \"patch_size\": 16}}'")
    state = read_state_dict(args.checkpoint)  # weights_only: nothing in the file is executed
    model = from_vit_pytorch(args.family, state, **kwargs)
    save(model.backbone, args.out, extra={"converted_from": f"vit-pytorch {args.family}"})
    save_head(model.head, args.out)
    print(f"wrote {Path(args.out)}: backbones.load / backbones.load_classifier read it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
