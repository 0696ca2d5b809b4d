"""Weights move between our ViTs and timm's / vit-pytorch's, and timm models serve as backbones."""
from __future__ import annotations

import pytest
import torch

import backbones
from backbones.convert import from_vit_pytorch, rename


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0, **kw)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_and_timm_load_each_other_strictly_with_equal_features(pool, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    # timm -> ours
    # timm's mean pool normalises after pooling (fc_norm) unless told not to; ours normalises tokens
    ref = _timm_vit(global_pool="token" if pool == "cls" else "avg", fc_norm=False).eval()
    ours = backbones.create("vit", image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, heads=2, pool=pool).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max() < 1e-5
        assert (ours(x) - ref(x)).abs().max() < 1e-5  # timm's avg pool skips the class token, as ours
    # ours (exported with backbones.save) -> a fresh timm model
    torch.manual_seed(1)
    trained = backbones.create("vit", image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, heads=2).eval()
    backbones.save(trained, tmp_path)
    from safetensors.torch import load_file

    fresh = _timm_vit().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "backbone.safetensors")), strict=True)
    with torch.no_grad():
        assert (fresh(x) - backbones.load(tmp_path)(x)).abs().max() < 1e-5


@pytest.mark.parametrize("family, cls_name, extra", [
    ("vit", "ViT", dict(pool="cls")),
    ("vit", "ViT", dict(pool="mean")),
    ("vit", "ViT", dict(heads=1, dim_head=32)),  # vit-pytorch drops the output projection here
    ("simple_vit", "SimpleViT", {}),
])
def test_vit_pytorch_weights_give_the_same_logits(family, cls_name, extra, tmp_path):
    vit_pytorch = pytest.importorskip("vit_pytorch")
    torch.manual_seed(0)
    args = dict(image_size=28, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, channels=1, dim_head=8)
    args.update(extra)
    ref = getattr(vit_pytorch, cls_name)(**args).eval()
    ours = from_vit_pytorch(family, ref.state_dict(), **args).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-5
    # the converted backbone saves and reloads like any other (and scores without vit-pytorch)
    backbones.save(ours.backbone, tmp_path)
    backbones.save_head(ours.head, tmp_path)
    with torch.no_grad():
        assert (backbones.load_classifier(tmp_path).eval()(x) - ref(x)).abs().max() < 1e-5


def test_vit_pytorch_conversion_refuses_unknown_keys_and_families():
    with pytest.raises(ValueError, match=r"keys this converter does not know: \['mystery'\]"):
        rename({"mystery": torch.zeros(1)}, [(r"known", "known")])
    with pytest.raises(ValueError, match="no vit-pytorch converter for 'nope'"):
        from_vit_pytorch("nope", {})


def test_a_timm_vit_serves_token_objectives_through_timms_own_modules():
    torch.manual_seed(0)
    bb = backbones.create("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2,
                          num_heads=2).eval()
    assert bb.supports_token_drop and bb.supports_mask_token and bb.supports_token_access
    assert (bb.embed_dim, bb.patch_size, bb.image_size, bb.num_prefix_tokens) == (32, 8, (32, 32), 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        # the token path reproduces timm's forward exactly
        tokens = bb.forward_tokens(bb.embed_patches(x) + bb.pos_embed_for(None))
        assert torch.allclose(tokens, bb.model.forward_features(x), atol=1e-6)
        assert torch.allclose(bb.pool(tokens), bb(x), atol=1e-6)
        # a subset of patches: the positions travel with their patches
        ids = torch.tensor([[0, 5, 9], [15, 1, 2]])
        sub = bb.forward_tokens(torch.gather(bb.embed_patches(x), 1, ids[..., None].expand(-1, -1, 32)) + bb.pos_embed_for(ids))
        assert sub.shape == (2, 4, 32)


def test_a_timm_cnn_is_a_pooled_backbone_and_local_weights_load_strictly(tmp_path):
    import timm
    from safetensors.torch import save_file

    bb = backbones.create("timm:resnet10t", in_chans=1)
    assert not (bb.supports_token_drop or bb.supports_mask_token or bb.supports_token_access)
    assert bb.embed_dim == 512 and bb.patch_size == 32
    # a classifier checkpoint of the same architecture: the head is dropped by name, the rest must fit
    ref = timm.create_model("resnet10t", pretrained=False, in_chans=1, num_classes=7).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = backbones.create("timm:resnet10t", in_chans=1, weights=str(tmp_path / "w.safetensors")).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)
    other = timm.create_model("resnet18", pretrained=False, in_chans=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="do not fit this timm model"):
        backbones.create("timm:resnet10t", in_chans=1, weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="pretrained=False"):
        backbones.create("timm:resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="timm.list_models"):
        backbones.create("timm:no_such_model")
    # saved and rebuilt through the registry like our own families
    backbones.save(loaded, tmp_path / "saved")
    with torch.no_grad():
        assert torch.allclose(backbones.load(tmp_path / "saved").eval()(x), loaded(x), atol=1e-6)


def test_the_convert_command_writes_a_loadable_classifier(tmp_path):
    import json

    vit_pytorch = pytest.importorskip("vit_pytorch")
    from backbones.import_vit_pytorch import main

    torch.manual_seed(0)
    args = dict(image_size=28, patch_size=7, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=32, channels=1, dim_head=8)
    ref = vit_pytorch.ViT(**args).eval()
    torch.save(ref.state_dict(), tmp_path / "vp.pt")
    assert main(["vit", str(tmp_path / "vp.pt"), "--kwargs", json.dumps(args), "--out", str(tmp_path / "out")]) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert (backbones.load_classifier(tmp_path / "out").eval()(x) - ref(x)).abs().max() < 1e-5
    with pytest.raises(SystemExit, match="--kwargs is not JSON"):
        main(["vit", str(tmp_path / "vp.pt"), "--kwargs", "{image_size: 28}", "--out", str(tmp_path / "o2")])


def test_timm_token_access_only_where_our_token_path_is_timms():
    """DeiT-distilled (two prefix tokens its own way) and CaiT are not plain VisionTransformers: they
    get the pooled embedding only, not a token path that would be silently wrong."""
    for name, kw in [("timm:deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
                     ("timm:cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))]:
        bb = backbones.create(name, **kw)
        assert not (bb.supports_token_access or bb.supports_token_drop or bb.supports_mask_token), name
        assert bb(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_a_saved_timm_backbone_does_not_need_its_weights_file(tmp_path):
    from safetensors.torch import save_file

    ref = backbones.create("timm:resnet10t", in_chans=1)
    save_file({k[len("model."):]: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = backbones.create("timm:resnet10t", in_chans=1, weights=str(tmp_path / "w.safetensors")).eval()
    backbones.save(bb, tmp_path / "saved")
    (tmp_path / "w.safetensors").unlink()
    assert "weights" not in backbones.load_meta(tmp_path / "saved")["kwargs"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbones.load(tmp_path / "saved").eval()(x), bb(x))
