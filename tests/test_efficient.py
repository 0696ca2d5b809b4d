"""Efficient ViT: mixers by name with per-instance flags, the approximations against exact
attention, fixed-length refusal, a user-registered mixer, settings errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import backbones
import objectives
from backbones import CapabilityError
from backbones.efficient import (LinformerAttention, NystromAttention, iterative_pinv, list_mixers, register_mixer,
                                 segment_means)
from backbones.layers import Attention


def small(**over):
    kw = backbones.example_config("efficient")
    kw.update(over)
    return backbones.create("efficient", **kw)


def test_flags_follow_the_mixer_per_instance():
    assert {"attention", "linformer", "nystrom"} <= set(list_mixers())
    nys, lin, att = small(), small(mixer="linformer", mixer_options={"k": 16}), small(mixer="attention",
                                                                                       mixer_options=None)
    assert nys.supports_token_drop and nys.supports_any_size and not nys.attention_maps
    assert not lin.supports_token_drop and not lin.supports_any_size and not lin.attention_maps
    assert att.supports_token_drop and att.attention_maps
    for m in (nys, lin, att):
        assert m.supports_token_access and m.supports_mask_token
    assert backbones.create("vit", **backbones.example_config("vit")).supports_token_drop  # the class is untouched
    assert sum(p.numel() for p in nys.parameters()) < 300_000
    with pytest.raises(CapabilityError, match="supports_token_drop"):
        objectives.create("mae", lin, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    for name, hp in (("simmim", {}), ("mpp", dict(bits=2))):  # full-length sequences: fine for linformer
        objectives.create(name, lin, **hp)


def test_attention_mixer_is_exactly_our_vit():
    torch.manual_seed(0)
    kw = dict(image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, heads=4)
    vit = backbones.create("vit", **kw).eval()
    eff = backbones.create("efficient", **kw, mixer="attention").eval()
    eff.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(eff.forward_features(x), vit.forward_features(x), atol=1e-6)
    probs = eff.attention_probs(x)  # the last block's
    assert probs.shape == (2, 4, 50, 50) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 50), atol=1e-5)
    with torch.no_grad():  # block 0's map, written out on the ViT
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
        tokens = torch.cat([cls, vit.embed_patches(x) + vit.pos_embed_for(None)], dim=1)  # (B, 1+N, D)
        want = vit.blocks[0].attn.attention_probs(vit.blocks[0].norm1(tokens))
        assert torch.allclose(eff.attention_probs(x, block=0), want, atol=1e-6)
    with pytest.raises(ValueError, match="mixer='nystrom' has no attention maps"):
        small().attention_probs(torch.randn(1, 1, 28, 28))


def _exact(dim=32, heads=4, n=20):
    torch.manual_seed(0)
    return Attention(dim, heads, qkv_bias=True).eval(), torch.randn(2, n, dim)


def test_nystrom_with_a_landmark_per_token_is_exact_attention():
    exact, x = _exact()
    nys = NystromAttention(32, 4, 20, None, True, num_landmarks=20, pinv_iterations=30, conv_kernel=0).eval()
    nys.qkv.load_state_dict(exact.qkv.state_dict())
    nys.proj.load_state_dict(exact.proj.state_dict())
    with torch.no_grad():
        assert (nys(x) - exact(x)).abs().max() < 1e-4
        # with few landmarks it approximates (uneven segments: 20 tokens in 6), and runs on any length
        few = NystromAttention(32, 4, 20, None, True, num_landmarks=6, conv_kernel=0).eval()
        few.load_state_dict(nys.state_dict())
        err = (few(x) - exact(x)).abs().mean() / exact(x).abs().mean()
        assert torch.isfinite(few(x)).all() and err < 0.5
        assert few(x[:, :7]).shape == (2, 7, 32) and few(x[:, :3]).shape == (2, 3, 32)


def test_segment_means_and_pinv():
    seg = segment_means(10, 4, torch.device("cpu"), torch.float32)  # segments of 3, 2, 3, 2
    assert torch.allclose(seg.sum(dim=1), torch.ones(4))
    assert (seg > 0).sum(dim=1).tolist() == [3, 2, 3, 2]
    assert torch.equal(segment_means(5, 5, torch.device("cpu"), torch.float32), torch.eye(5))
    torch.manual_seed(0)
    a = torch.randn(3, 8, 8).softmax(dim=-1)
    assert torch.allclose(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-3)


def test_linformer_with_identity_projections_is_exact_and_refuses_other_lengths():
    exact, x = _exact()
    lin = LinformerAttention(32, 4, 20, None, True, k=20).eval()
    lin.qkv.load_state_dict(exact.qkv.state_dict())
    lin.proj.load_state_dict(exact.proj.state_dict())
    with torch.no_grad():
        lin.proj_k.copy_(torch.eye(20))
        lin.proj_v.copy_(torch.eye(20))
        assert (lin(x) - exact(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="fixed sequence of 20 tokens, got 5"):
        lin(x[:, :5])
    shared = LinformerAttention(32, 4, 20, None, True, k=8, share_kv=True)
    assert shared.proj_v is None and shared(x).shape == (2, 20, 32)


def test_token_drop_with_nystrom_and_refusal_with_linformer():
    torch.manual_seed(0)
    nys = small().eval()
    x = torch.randn(2, 1, 28, 28)
    ids = torch.tensor([[0, 5, 9, 30], [48, 1, 2, 3]])
    tokens = nys.embed_patches(x)
    sub = torch.gather(tokens, 1, ids[..., None].expand(-1, -1, 64)) + nys.pos_embed_for(ids)
    assert nys.forward_tokens(sub).shape == (2, 5, 64)
    assert nys(torch.randn(2, 1, 16, 16)).shape == (2, 64)  # another size: positions resampled
    lin = small(mixer="linformer", mixer_options={"k": 16}).eval()
    with pytest.raises(ValueError, match="no token drop"):
        lin.forward_tokens(sub)
    with pytest.raises(ValueError, match="does not fit"):
        lin(torch.randn(2, 1, 16, 16))
    assert lin(x).shape == (2, 64)


def test_mae_step_with_nystrom_reaches_every_parameter():
    torch.manual_seed(0)
    model = small()
    obj = objectives.create("mae", model, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    obj({"views": [torch.randn(4, 1, 28, 28)]})["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class _TokenShift(nn.Module):
    """A toy mixer for the registry test: each token takes the mean of itself and its predecessor."""

    def __init__(self, dim, heads, seq_len, head_dim, qkv_bias, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x):
        return self.proj(self.scale * (x + torch.roll(x, 1, dims=1)) / 2)


if "test_token_shift" not in list_mixers():
    register_mixer("test_token_shift", any_length=True)(_TokenShift)


def test_a_user_mixer_registers_builds_and_saves(tmp_path):
    model = small(mixer="test_token_shift", mixer_options={"scale": 0.5}).eval()
    assert isinstance(model.blocks[0].attn, _TokenShift) and model.blocks[0].attn.scale == 0.5
    assert model.supports_token_drop and not model.attention_maps
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), again(x))
    with pytest.raises(ValueError, match="registered twice"):
        register_mixer("test_token_shift", any_length=True)(_TokenShift)
    with pytest.raises(ValueError, match="must take the keyword arguments .* lacks seq_len"):
        register_mixer("test_bad", any_length=True)(lambda dim, heads, head_dim, qkv_bias: nn.Identity())


def test_save_load_round_trip_keeps_the_mixer_options(tmp_path):
    model = small().eval()
    backbones.save(model, tmp_path)
    meta = backbones.load_meta(tmp_path)
    assert meta["kwargs"]["mixer"] == "nystrom" and meta["kwargs"]["mixer_options"] == {"num_landmarks": 8,
                                                                                          "conv_kernel": 9}
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), backbones.load(tmp_path).eval()(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mixer="performer"), "mixer='performer' is not registered; registered mixers are: attention"),
    (dict(mixer_options={"landmarks": 4}), "mixer 'nystrom' has no option 'landmarks'; its options are: num_landmarks"),
    (dict(mixer="linformer", mixer_options={"k": 0}), "k=0"),
    (dict(mixer_options={"conv_kernel": 4}), "conv_kernel=4 must be odd"),
    (dict(mixer_options=[8]), "mixer_options=\\[8\\] must be a dict"),
    (dict(heads=5), "heads=5 must divide dim=64"),
    (dict(depth=0), "depth=0 must be an integer >= 1"),
    (dict(image_size=30), "image_size=30 is not divisible by patch_size=4"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


# --------------------------------------------------------------------------- vit-pytorch references (optional packages)

def _vit_pytorch_efficient_packages():
    for name in ("vit_pytorch", "nystrom_attention", "linformer"):
        pytest.importorskip(name)


def _count(model: nn.Module) -> int:  # bench.families.count: without the 1000-class head
    return sum(p.numel() for p in model.parameters() if not (p.ndim >= 1 and p.shape[0] == 1000))


def test_references_build_on_both_sides_with_the_same_input():
    _vit_pytorch_efficient_packages()
    from backbones.convert import REFERENCES, build_vit_pytorch

    refs = [r for r in REFERENCES if r.family == "efficient"]
    assert sorted(r.size for r in refs) == ["base", "base-linformer", "small", "small-linformer"]
    assert len({(r.family, r.size) for r in REFERENCES}) == len(REFERENCES)  # bench.families looks rows up by these
    for ref in refs:
        mixer = "linformer" if ref.size.endswith("linformer") else "nystrom"
        assert ref.vp_kwargs["mixer"] == ref.ours["mixer"] == mixer and ref.input_shape == (3, 224, 224)
        assert ref.note
        theirs, ours = build_vit_pytorch(ref).eval(), backbones.create("efficient", **ref.ours).eval()
        assert _count(theirs) == _count(ours)
        x = torch.randn(1, *ref.input_shape)
        with torch.no_grad():
            assert theirs(x).shape == (1, 1000) and ours(x).shape == (1, ref.ours["dim"])


def _carry(theirs: nn.Module, ours: nn.Module, mixer: str, depth: int) -> None:
    """Their weights into ours (the block layouts differ only in names and the linformer's fused qkv)."""
    sd, new = theirs.state_dict(), {}
    if mixer == "linformer":
        names = {"0.norm": "norm1", "0.fn.to_out": "attn.proj", "1.norm": "norm2", "1.fn.w1": "mlp.fc1",
                 "1.fn.w2": "mlp.fc2"}
        prefix = "transformer.net.layers"
    else:
        names = {"0.norm": "norm1", "0.fn.to_qkv": "attn.qkv", "0.fn.to_out.0": "attn.proj", "0.fn.res_conv": "attn.conv",
                 "1.norm": "norm2", "1.fn.net.0": "mlp.fc1", "1.fn.net.3": "mlp.fc2"}
        prefix = "transformer.layers"
    for i in range(depth):
        p = f"{prefix}.{i}."
        for a, b in names.items():
            for t in ("weight", "bias"):
                if p + a + "." + t in sd:
                    new[f"blocks.{i}.{b}.{t}"] = sd[p + a + "." + t]
        if mixer == "linformer":
            new[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[p + f"0.fn.to_{n}.weight"] for n in "qkv"])
            new[f"blocks.{i}.attn.proj_k"], new[f"blocks.{i}.attn.proj_v"] = sd[p + "0.fn.proj_k"], sd[p + "0.fn.proj_v"]
    for a, b in (("1", "norm_in"), ("2", "proj"), ("3", "norm_out")):
        for t in ("weight", "bias"):
            new[f"patch_embed.{b}.{t}"] = sd[f"to_patch_embedding.{a}.{t}"]
    new.update(cls_token=sd["cls_token"], pos_embed=sd["pos_embedding"], **{"norm.weight": sd["mlp_head.0.weight"],
                                                                          "norm.bias": sd["mlp_head.0.bias"]})
    ours.load_state_dict(new, strict=True)


@pytest.mark.parametrize("mixer, options", [
    ("linformer", dict(k=8, dim_head=16)),
    # a landmark per token (17 = 16 patches + class token): no padding on their side, so the same network; enough
    # pinv steps that both converge (their starting scale is one max over the batch and heads, ours per matrix)
    ("nystrom", dict(dim_head=16, num_landmarks=17, pinv_iterations=20, attn_values_residual_conv_kernel=5)),
])
def test_same_weights_give_the_same_logits(mixer, options):
    _vit_pytorch_efficient_packages()
    from backbones.efficient import ours_like_vit_pytorch_efficient, vit_pytorch_efficient

    torch.manual_seed(0)
    vp = dict(mixer=mixer, image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, **options)
    theirs = vit_pytorch_efficient(**vp).eval()
    ours = backbones.create("efficient", **ours_like_vit_pytorch_efficient(**vp)).eval()
    _carry(theirs, ours, mixer, depth=2)
    head = theirs.mlp_head[1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (head(ours(x)) - theirs(x)).abs().max() < 1e-4
