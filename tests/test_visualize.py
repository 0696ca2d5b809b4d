"""Pictures: the attention recorder, MAE / SimMIM reconstructions, the PNG writers and the
`python -m eval.visualize` command on a checkpoint trained by the real trainer.

Real parts only: registered backbones, the real objectives, matplotlib's Agg canvas, PIL to read
the PNGs back, the real pretrain CLI and a real sqlite MLflow store in tmp_path.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from mlflow import MlflowClient
from PIL import Image

import backbones
import objectives
from eval import pictures, tracking
from eval.attention import AttentionRecorder, attention_families, class_attention_maps, record_attention
from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist
from eval.visualize import dataset_images, main as visualize_main

from helpers import ROOT, clean_env, only_run_dir, run_pretrain, write_fashion_subset

PRE = {"mean": [0.286], "std": [0.353]}


def example(name: str, **over) -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create(name, **{**backbones.example_config(name), **over}).eval()


def inputs(model: backbones.Backbone, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, *model.input_shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the recorder


def expected_layers(name: str, m: backbones.Backbone) -> tuple[int, int, int]:
    """(layers, heads, tokens) the recorder must return for each family's example configuration
    (see eval/attention.py: which layers each family records)."""
    if name == "cait":  # the self-attention stage over the patches; class attention not recorded
        return len(m.blocks), m.blocks[0].attn.heads, m.num_patches
    if name == "cross_vit":  # the small-patch branch's self-attention, [class token, small patches]
        blocks = [b for stage in m.stages for b in stage.sm_blocks]
        return len(blocks), blocks[0].attn.heads, 1 + m.num_patches
    if name == "vivit":  # factorised encoder: the temporal transformer over [class token, time steps]
        return len(m.temporal_blocks), m.temporal_blocks[0].attn.heads, 1 + m.grid_size[0]
    return len(m.blocks), m.blocks[0].attn.heads, m.num_prefix_tokens + m.num_patches


def test_every_family_with_attention_maps_is_covered():
    names = backbones.list_backbones()
    capable = [n for n in names if example(n).attention_maps]
    assert list(attention_families()) == capable
    assert {"vit", "simple_vit", "cait", "cross_vit", "deepvit", "navit", "vivit", "vit_1d", "vit_3d"} <= set(capable)


@pytest.mark.parametrize("name", attention_families())
def test_recorder_shape_and_rows(name):
    m = example(name)
    x = inputs(m)
    attn = record_attention(m, x)
    layers, heads, tokens = expected_layers(name, m)
    assert attn.dtype == torch.float32
    assert tuple(attn.shape) == (2, layers, heads, tokens, tokens)
    assert torch.isfinite(attn).all()
    if name != "deepvit":  # re-attention normalises across heads: its rows are not distributions
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5, rtol=0)
    other = record_attention(m, inputs(m, seed=2))
    assert not torch.allclose(attn, other), "the maps do not depend on the input"


def test_recorder_equals_a_hand_computation_for_a_vit():
    m = example("vit")
    x = inputs(m, b=3)
    attn = record_attention(m, x)  # (B, L, H, N, N)
    with torch.no_grad():
        tokens = m.patch_embed(x) + m.pos_embed[:, 1:]
        cls = (m.cls_token + m.pos_embed[:, :1]).expand(3, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)  # (B, 1+N, D)
        for i, block in enumerate(m.blocks):
            h = F.layer_norm(tokens, (m.embed_dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
            qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias  # (B, N, 3 * inner)
            q, k, _ = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=block.attn.heads)
            want = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            torch.testing.assert_close(attn[:, i], want, atol=1e-5, rtol=1e-4)
            tokens = block(tokens)


@pytest.mark.parametrize("name", ["vit", "cait", "cross_vit", "navit"])
def test_forward_output_is_unchanged_and_hooks_are_removed(name):
    m = example(name).train()
    x = inputs(m)
    with torch.no_grad():
        m.eval()
        plain = m(x)
        m.train()
    recorder = AttentionRecorder(m)
    with recorder, torch.no_grad():
        assert not m.training  # recorded in eval mode
        hooked = m(x)
    assert m.training  # the training flag is restored
    assert torch.equal(plain, hooked)
    assert recorder.calls and all(not mod._forward_hooks for mod in m.modules())


def test_layer_selection():
    m = example("vit")
    x = inputs(m)
    every = record_attention(m, x)
    torch.testing.assert_close(record_attention(m, x, layers=-1), every[:, -1:])
    torch.testing.assert_close(record_attention(m, x, layers=[1, 0]), every[:, [1, 0]])
    with pytest.raises(ValueError, match=r"layers=\[2\]: this backbone records 2 self-attention layers"):
        record_attention(m, x, layers=[2])


def test_a_backbone_without_the_capability_is_refused():
    m = example("twins_svt")
    with pytest.raises(ValueError, match="'twins_svt' has no attention maps.*families that have them: cait, .*vit"):
        record_attention(m, inputs(m))
    nystrom = example("efficient")  # the example's mixer approximates attention: no maps
    with pytest.raises(ValueError, match="'efficient' has no attention maps"):
        record_attention(nystrom, inputs(nystrom))
    exact = example("efficient", mixer="attention", mixer_options=None)
    assert record_attention(exact, inputs(exact)).shape == (2, 2, 4, 50, 50)


def test_factorised_video_attention_is_refused_with_the_alternative():
    m = example("vivit", variant="factorized_self_attention")
    with pytest.raises(ValueError, match=r"no self-attention layer over a whole sample.*backbone.attention_probs"):
        record_attention(m, inputs(m))


def test_class_attention_maps():
    attn = torch.rand(2, 3, 1 + 12, 1 + 12).softmax(-1)
    maps = class_attention_maps(attn, 1, (3, 4))
    assert maps.shape == (2, 3, 3, 4)
    torch.testing.assert_close(maps[1, 2, 2, 1], attn[1, 2, 0, 1 + 2 * 4 + 1])
    no_cls = class_attention_maps(attn[..., 1:, 1:], 0, (3, 4))  # the mean attention each patch receives
    torch.testing.assert_close(no_cls[0, 1, 0, 3], attn[0, 1, 1:, 1 + 3].mean())
    with pytest.raises(ValueError, match="does not hold num_prefix_tokens=0 plus a 3x4 grid"):
        class_attention_maps(attn, 0, (3, 4))
    with pytest.raises(ValueError, match=r"expected one layer's \(B, H, N, N\)"):
        class_attention_maps(attn[None], 1, (3, 4))


def test_maps_follow_the_recorded_cls_row_for_a_real_vit():
    m = example("vit")
    attn = record_attention(m, inputs(m), layers=-1)[:, 0]
    maps = class_attention_maps(attn, m.num_prefix_tokens, m.grid_size)
    torch.testing.assert_close(maps.flatten(2), attn[:, :, 0, 1:])


# --------------------------------------------------------------------------- reconstructions


@pytest.mark.parametrize("objective,hp", [
    ("mae", dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)),
    ("mae", dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=True)),
    ("simmim", {}),
])
def test_reconstruct_images(objective, hp):
    torch.manual_seed(0)
    obj = objectives.create(objective, example("vit"), **hp).eval()
    x = inputs(obj.backbone, b=3)
    out = obj.reconstruct_images(x, generator=torch.Generator().manual_seed(5))
    assert set(out) == {"original", "masked", "reconstruction", "mask"}
    assert all(v.shape == x.shape for v in out.values())
    mask = out["mask"].bool()
    masked_share = (49 - round(49 * 0.25)) / 49 if objective == "mae" else obj.num_masked / 49  # 37 / 49, 30 / 49
    assert abs(mask.float().mean().item() - masked_share) < 1e-6
    torch.testing.assert_close(out["original"], x)
    assert torch.equal(out["reconstruction"][~mask], x[~mask])  # visible patches: the original
    assert torch.equal(out["masked"][~mask], x[~mask]) and (out["masked"][mask] == 0).all()
    assert not torch.allclose(out["reconstruction"][mask], x[mask])
    again = obj.reconstruct_images(x, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(out[k], again[k]) for k in out)  # the generator fixes the mask
    other = obj.reconstruct_images(x, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(out["mask"], other["mask"])


def test_mae_with_norm_pix_loss_un_normalises_with_each_patch_statistics():
    torch.manual_seed(0)
    mae = objectives.create("mae", example("vit"), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                            norm_pix_loss=True).eval()
    x = inputs(mae.backbone)
    out = mae.reconstruct_images(x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent, mask, ids = mae.forward_encoder(x, torch.Generator().manual_seed(3))
        pred = mae.forward_decoder(latent, ids)  # (B, N, p*p*C), in normalised-patch units
    target = mae.patchify(x)
    want = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    got = mae.patchify(out["reconstruction"])
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the PNG writers


def png(path) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size, np.asarray(img.convert("RGB"))


def test_attention_grid_png(tmp_path):
    images, maps = torch.randn(3, 1, 28, 28), torch.rand(3, 4, 7, 7)
    size, a = png(pictures.attention_grid(images, maps, tmp_path / "a.png", **PRE))
    assert size == pictures.grid_px(3, 4 + 2)
    _, b = png(pictures.attention_grid(images, torch.rand(3, 4, 7, 7), tmp_path / "b.png", **PRE))
    _, c = png(pictures.attention_grid(torch.randn(3, 1, 28, 28), maps, tmp_path / "c.png", **PRE))
    assert (a != b).any() and (a != c).any()
    with pytest.raises(ValueError, match=r"expected \(B, heads, gh, gw\)"):
        pictures.attention_grid(images, maps[:2], tmp_path / "d.png")


def test_reconstruction_grid_png(tmp_path):
    def recon(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(2, 3, 32, 32, generator=g) for k in pictures.RECONSTRUCTION_COLUMNS}

    size, a = png(pictures.reconstruction_grid(recon(0), tmp_path / "a.png", [0.5] * 3, [0.25] * 3))
    assert size == pictures.grid_px(2, 3)
    _, b = png(pictures.reconstruction_grid(recon(1), tmp_path / "b.png", [0.5] * 3, [0.25] * 3))
    assert (a != b).any()
    with pytest.raises(ValueError, match="recon lacks masked"):
        pictures.reconstruction_grid({"original": torch.zeros(1, 1, 8, 8), "reconstruction": torch.zeros(1, 1, 8, 8)},
                                     tmp_path / "c.png")


def test_embeddings_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    feats = torch.randn(300, 16, generator=g) + 4 * F.one_hot(labels, 16).float()
    size, a = png(pictures.embeddings_plot(feats, labels, tmp_path / "a.png", ["cat", "dog", "bird"]))
    assert size == pictures.EMBED_PX
    _, b = png(pictures.embeddings_plot(torch.randn(300, 16, generator=g), labels, tmp_path / "b.png", ["cat", "dog", "bird"]))
    assert (a != b).any()
    xy = pictures.pca_2d(feats)  # the classes separate along the two main directions
    centres = torch.stack([xy[labels == c].mean(0) for c in range(3)])
    assert torch.cdist(centres, centres)[~torch.eye(3, dtype=torch.bool)].min() > 3


def test_curves_png(tmp_path):
    history = {"loss": [(s, 1 / (s + 1)) for s in range(0, 50, 5)], "knn/top1_k20": [(0, 0.2), (45, 0.6)]}
    size, a = png(pictures.curves_plot(history, tmp_path / "a.png"))
    assert size == (2 * pictures.CURVE_PX[0], pictures.CURVE_PX[1])
    _, b = png(pictures.curves_plot({**history, "knn/top1_k20": [(0, 0.2), (45, 0.9)]}, tmp_path / "b.png"))
    assert (a != b).any()
    with pytest.raises(ValueError, match="history has no points"):
        pictures.curves_plot({"loss": []}, tmp_path / "c.png")


# --------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real MAE run of the tiny recipe (10 steps, checkpoints at 0, 5, 10), with kNN scores
    logged into its MLflow run at steps 0 and 10 as `python -m eval.run` does (the trainer's own
    kNN pass is off: it would double the time of this fixture)."""
    out = tmp_path_factory.mktemp("runs")
    run_pretrain("--recipe", "tiny", f"train.out_dir={out}", "eval.knn=false")
    run_dir = only_run_dir(out)
    run = json.loads((run_dir / "run.json").read_text())
    for step, score in ((0, 0.31), (10, 0.42)):
        tracking.log_metrics(run["mlflow_run_id"], {"knn/top1@20": score}, step, run["tracking_uri"])
    return out, run_dir


def test_cli_writes_the_pictures_and_logs_them_to_mlflow(tiny_run):
    out, run_dir = tiny_run
    proc = subprocess.run([sys.executable, "-m", "eval.visualize", str(run_dir), "--num-images", "4",
                           "--embed-images", "300"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_dir / "checkpoints/step-000010/pictures"  # the newest checkpoint of the run folder
    names = ["attention.png", "reconstructions.png", "embeddings.png", "curves.png"]
    assert proc.stdout.split() == [str(folder / n) for n in names]
    meta = json.loads((run_dir / "checkpoints/step-000010/backbone.json").read_text())
    heads = meta["kwargs"]["heads"]
    assert png(folder / "attention.png")[0] == pictures.grid_px(4, heads + 2)
    assert png(folder / "reconstructions.png")[0] == pictures.grid_px(4, 3)
    assert png(folder / "embeddings.png")[0] == pictures.EMBED_PX
    assert png(folder / "curves.png")[0] == (2 * pictures.CURVE_PX[0], pictures.CURVE_PX[1])  # loss, knn/top1_k20
    assert "logged to MLflow run" in proc.stderr

    run = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(run["tracking_uri"])
    logged = client.list_artifacts(run["mlflow_run_id"], "pictures/step-000010")
    assert sorted(a.path for a in logged) == sorted(f"pictures/step-000010/{n}" for n in names)
    local = client.download_artifacts(run["mlflow_run_id"], "pictures/step-000010/attention.png", str(out / "dl"))
    assert png(local)[1].tolist() == png(folder / "attention.png")[1].tolist()


def test_cli_user_images_any_checkpoint_and_no_mlflow(tiny_run, tmp_path, capsys):
    _, run_dir = tiny_run
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 20), 200, dtype=np.uint8)).save(tmp_path / "b.jpg")
    ckpt = run_dir / "checkpoints/step-000005"
    code = visualize_main([str(ckpt), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--out", str(tmp_path / "pics"),
                           "--layer", "0", "--embed-images", "50", "--no-mlflow"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert written[:2] == [str(tmp_path / "pics/attention.png"), str(tmp_path / "pics/reconstructions.png")]
    assert png(tmp_path / "pics/attention.png")[0][1] == pictures.grid_px(2, 1)[1]  # one row per user image
    run = json.loads((run_dir / "run.json").read_text())
    assert not MlflowClient(run["tracking_uri"]).list_artifacts(run["mlflow_run_id"], "pictures/step-000005")


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/nowhere"], "TARGET {tmp}/nowhere does not exist"),
    (["{ckpt}", "--layer", "2"], "--layer=2: this backbone records 2 self-attention layers"),
    (["{ckpt}", "{tmp}/not-an-image.png"], "image {tmp}/not-an-image.png cannot be read as PNG / JPEG"),
    (["{ckpt}", "--num-images", "0"], "--num-images=0: use at least 1"),
])
def test_cli_errors_are_one_line_and_exit_2(tiny_run, tmp_path, capsys, argv, message):
    _, run_dir = tiny_run
    (tmp_path / "not-an-image.png").write_text("hello")
    fill = dict(tmp=tmp_path, ckpt=run_dir / "checkpoints/step-000010")
    code = visualize_main([a.format(**fill) for a in argv] + ["--no-mlflow", "--out", str(tmp_path / "pics")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("eval.visualize: error: ") and message.format(**fill) in err[0]


def test_cli_on_a_checkpoint_of_a_shard_run_draws_the_shards_test_images(tiny_run, tmp_path, capsys):
    """A checkpoint whose backbone.json names shards: the pictures come from its test shards, the
    embeddings are coloured by the manifest's class names."""
    shards = write_fashion_subset(tmp_path / "shards", n=96, shard_size=32)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run[1] / "checkpoints/step-000010", ckpt)
    meta = json.loads((ckpt / "backbone.json").read_text())
    meta["data"] = {"train": str(shards), "test": str(shards)}
    (ckpt / "backbone.json").write_text(json.dumps(meta))

    first, labels, classes = dataset_images(meta, 5)
    want_images, want_labels = load_fashion_mnist("train")  # write_fashion_subset: the first 96 train images
    assert torch.equal(first, want_images[:5]) and torch.equal(labels, want_labels[:5])
    assert classes == list(FASHION_MNIST_CLASSES)
    sample, sample_labels, _ = dataset_images(meta, 40, labelled=True)
    assert sample.shape == (40, 1, 28, 28) and not torch.equal(sample_labels, want_labels[:40])  # a random sample

    assert visualize_main([str(ckpt), "--num-images", "3", "--embed-images", "50"]) == 0  # no run folder: no MLflow
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["attention.png", "reconstructions.png", "embeddings.png"]
    assert png(ckpt / "pictures/attention.png")[0][1] == pictures.grid_px(3, 1)[1]
