"""Evaluation layer: kNN, linear probe, features + cache, MLflow tracking, score_checkpoint and the CLI.

Real parts only: real backbones, a real sqlite MLflow store in tmp_path, the built-in Fashion-MNIST.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import backbones
from eval import tracking
from eval.features import cached_features, extract_features
from eval.knn import knn_accuracy, knn_classify
from eval.linear import train_heads, linear_probe
from eval.run import find_checkpoints, format_table, score_backbone, score_checkpoint, TargetError

ROOT = Path(__file__).resolve().parents[1]
PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=1, heads=2)


def fashion_mnist(split: str):
    from data.builtin import DatasetNotFoundError, load_fashion_mnist

    try:
        return load_fashion_mnist(split)
    except DatasetNotFoundError as exn:
        pytest.skip(f"built-in dataset missing ({exn}); run ./setup.sh")


# --------------------------------------------------------------------------- kNN


def reference_knn(train, train_labels, test, num_classes, k, temperature):
    """Plain DINO kNN, one test sample at a time."""
    scores = torch.zeros(test.shape[0], num_classes)
    for i, q in enumerate(test):
        sims = F.cosine_similarity(q[None], train, dim=1)
        top, idx = sims.topk(k)
        for s, j in zip(top, idx):
            scores[i, train_labels[j]] += torch.exp(s / temperature)
    return scores


@pytest.fixture
def knn_data():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g) * 3 + 1, torch.randn(57, 16, generator=g) * 3 + 1
    return train, torch.randint(0, 7, (300,), generator=g), test, torch.randint(0, 7, (57,), generator=g)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_reference(knn_data, k):
    train, ytr, test, _ = knn_data
    got = knn_classify(train, ytr, test, num_classes=7, k=k, temperature=0.1)
    want = reference_knn(train, ytr, test, 7, k, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_knn_chunking_changes_nothing(knn_data):
    from eval.knn import nearest_neighbours

    train, ytr, test, _ = knn_data
    one = nearest_neighbours(train, test, 20, chunk_size=10_000, train_chunk_size=10_000)
    tiled = nearest_neighbours(train, test, 20, chunk_size=7, train_chunk_size=13)  # ragged tiles both ways
    torch.testing.assert_close(tiled[0], one[0])
    assert torch.equal(tiled[1], one[1])
    torch.testing.assert_close(knn_classify(train, ytr, test, 7, chunk_size=5), knn_classify(train, ytr, test, 7, chunk_size=1000))


def test_knn_accuracy_all_ks_from_one_pass(knn_data):
    train, ytr, test, yte = knn_data
    got = knn_accuracy(train, ytr, test, yte, num_classes=7, ks=(20, 5))
    assert set(got) == {"top1@5", "top5@5", "top1@20", "top5@20"}
    for k in (5, 20):
        ref = reference_knn(train, ytr, test, 7, k, 0.07)
        assert got[f"top1@{k}"] == pytest.approx((ref.argmax(1) == yte).float().mean().item())
        top5 = (ref.topk(5, dim=1).indices == yte[:, None]).any(1).float().mean().item()
        assert got[f"top5@{k}"] == pytest.approx(top5)


def test_knn_refuses_k_larger_than_train(knn_data):
    train, ytr, test, _ = knn_data
    with pytest.raises(ValueError, match="k=301"):
        knn_classify(train, ytr, test, 7, k=301)


def test_knn_on_raw_pixels():
    """STACK.md: raw-pixel kNN scores 84.6 % with all data; 10,000 / 2,000 must clear 75 %."""
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    flat = lambda x: rearrange(x, "n c h w -> n (c h w)").float()  # noqa: E731
    got = knn_accuracy(flat(xtr[:10_000]), ytr[:10_000], flat(xte[:2_000]), yte[:2_000], num_classes=10)
    assert got["top1@20"] > 0.75, got


# --------------------------------------------------------------------------- linear probe


def test_linear_heads_match_torch_batchnorm_linear_sgd():
    """The hand-written step equals nn.Sequential(BatchNorm1d(affine=False), Linear) under torch.optim.SGD."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(100, 6, generator=g) * 2 + 5, torch.randint(0, 4, (100,), generator=g)
    epochs, bs, lr, seed = 3, 32, 0.2, 11
    heads = train_heads(x, y, 4, [lr], epochs, bs, seed)

    gen = torch.Generator().manual_seed(seed)  # same draws as train_heads: init, then one permutation per epoch
    model = nn.Sequential(nn.BatchNorm1d(6, affine=False), nn.Linear(6, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 6, generator=gen) * 0.01)
        model[1].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    total, step = epochs * (100 // bs), 0
    for _ in range(epochs):
        order = torch.randperm(100, generator=gen)
        for i in range(100 // bs):
            idx = order[i * bs : (i + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total))).item()
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    torch.testing.assert_close(heads.weight, model[1].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(heads.bias[:, 0], model[1].bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(heads.running_mean, model[0].running_mean)
    torch.testing.assert_close(heads.running_var, model[0].running_var)
    model.eval()
    torch.testing.assert_close(heads.predict(x)[0], model(x).detach(), rtol=1e-4, atol=1e-4)


def _blobs(n: int, g: torch.Generator):
    centres = torch.randn(5, 32, generator=torch.Generator().manual_seed(42)) * 4
    y = torch.randint(0, 5, (n,), generator=g)
    return centres[y] + torch.randn(n, 32, generator=g), y


def test_linear_probe_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    (x, y), (xt, yt) = _blobs(3000, g), _blobs(1000, g)
    got = linear_probe(x, y, xt, yt, num_classes=5, epochs=5)
    assert got["top1"] > 0.95 and got["top5"] == 1.0, got
    assert got["lr"] in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def test_linear_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    x, xt = torch.randn(3000, 32, generator=g), torch.randn(2000, 32, generator=g)
    y, yt = torch.randint(0, 10, (3000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    got = linear_probe(x, y, xt, yt, num_classes=10, epochs=5)
    assert 0.05 < got["top1"] < 0.15, got


def test_linear_probe_restores_thread_count():
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(2)
    x, y = _blobs(300, g)
    linear_probe(x, y, x, y, num_classes=5, epochs=1, lrs=(0.1,))
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- features


def test_extract_features_shape_mode_and_batches():
    model = tiny_vit()
    model.train()
    seen_modes = []
    model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(37)
    feats, labs = extract_features(model, images, labels, PREPROCESS, batch_size=16)
    assert feats.shape == (37, 32) and feats.dtype == torch.float32
    assert torch.equal(labs, labels)
    assert seen_modes == [False, False, False]  # ceil(37 / 16) batches, all in eval mode
    assert model.training  # restored
    # an iterable of (images, labels) batches gives the same features
    batches = [(images[:20], labels[:20]), (images[20:], labels[20:])]
    feats2, labs2 = extract_features(model, batches, None, PREPROCESS)
    torch.testing.assert_close(feats2, feats)
    assert torch.equal(labs2, labels)


def test_extract_features_errors_are_specific():
    model = tiny_vit()
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="preprocess is missing std"):
        extract_features(model, images, None, {"image_size": [28, 28], "mean": [0.5]})
    with pytest.raises(ValueError, match="labels must be None"):
        extract_features(model, [(images, torch.zeros(4))], torch.zeros(4), PREPROCESS)


def test_cached_features_reused(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(10, 4), torch.arange(10)

    a = cached_features(tmp_path, "demo-train", compute)
    b = cached_features(tmp_path, "demo-train", compute)
    assert len(calls) == 1
    assert (tmp_path / "features" / "demo-train.safetensors").is_file()
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not [p for p in (tmp_path / "features").iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- tracking


def test_tracking_uri_and_experiment_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    uri = tracking.tracking_uri("runs")
    assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
    exp_id = tracking.get_experiment_id("demo", "runs")
    assert tracking.get_experiment_id("demo", "runs") == exp_id
    exp = tracking.client(uri).get_experiment(exp_id)
    assert exp.artifact_location == (root.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri("runs") == "http://127.0.0.1:5000"
    assert tracking.mlflow_metric_name("knn/top1@20") == "knn/top1_k20"


# --------------------------------------------------------------------------- checkpoints and the CLI


def make_run(tmp_path: Path, steps=(500, 1000)) -> tuple[Path, str, str]:
    """A run folder with tiny-ViT checkpoints (as the trainer writes them) and an MLflow run named in run.json."""
    run_dir = tmp_path / "run"
    for step in steps:
        extra = {"step": step, "objective": "mae", "preprocess": PREPROCESS, "data": {"train": None, "test": None}}
        backbones.save(tiny_vit(step), run_dir / "checkpoints" / f"step-{step:06d}", extra=extra)
    (run_dir / "checkpoints" / ".tmp-step-001500").mkdir()  # a checkpoint being written: ignored
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_id, _ = tracking.start_run("vit-ssl-pretrain", tmp_path / "store", uri=uri)
    tracking.write_run_json(run_dir, run_id, uri, "vit-ssl-pretrain")
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == run_id
    return run_dir, run_id, uri


def test_find_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1000, 500, 20):
        backbones.save(tiny_vit(), run_dir / "checkpoints" / f"step-{step:06d}", extra={"step": step})
    (run_dir / "checkpoints" / ".tmp-step-002000").mkdir()
    ckpts, found_run = find_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step-000020", "step-000500", "step-001000"] and found_run == run_dir
    assert find_checkpoints(ckpts[0]) == ([ckpts[0]], run_dir)
    with pytest.raises(TargetError, match="neither a checkpoint folder"):
        find_checkpoints(tmp_path)


def test_score_backbone_and_checkpoint_then_cli_logs_to_the_pretraining_run(tmp_path):
    fashion_mnist("test")  # skip early when the data is missing
    run_dir, run_id, uri = make_run(tmp_path)
    first = run_dir / "checkpoints" / "step-000500"

    # in-process: every score, features cached in the checkpoint
    scores = score_checkpoint(first, knn=True, linear=True, train_samples=2000)
    assert set(scores) == {"knn/top1@20", "knn/top5@20", "linear/top1", "linear/top5"}
    assert 0.3 < scores["knn/top1@20"] <= 1 and 0.3 < scores["linear/top1"] <= 1, scores  # chance is 0.1
    cache = sorted(p.name for p in (first / "features").iterdir())
    assert cache == ["fmnist-test.safetensors", "fmnist-train-2000.safetensors"]
    mtime = (first / "features" / "fmnist-test.safetensors").stat().st_mtime_ns
    assert score_checkpoint(first, train_samples=2000)["knn/top1@20"] == scores["knn/top1@20"]
    assert (first / "features" / "fmnist-test.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten

    # score_backbone on in-memory data gives the same kNN score as the cached checkpoint path
    train_x, train_y = fashion_mnist("train")
    from eval.run import subset_indices

    keep = subset_indices(2000, len(train_y))
    direct = score_backbone(backbones.load(first), PREPROCESS, (train_x[keep], train_y[keep]), fashion_mnist("test"))
    assert direct["knn/top1@20"] == pytest.approx(scores["knn/top1@20"], abs=1e-4)

    # the CLI on the run folder: step 500 from the cache, step 1000 computed; both logged at their step
    mlruns_before = (ROOT / "mlruns").exists()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.run", str(run_dir), "--knn", "--train-samples", "2000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_id in proc.stdout and "knn/top1@20" in proc.stdout
    history = tracking.client(uri).get_metric_history(run_id, tracking.mlflow_metric_name("knn/top1@20"))
    assert sorted(m.step for m in history) == [500, 1000]
    at_500 = next(m.value for m in history if m.step == 500)
    assert at_500 == pytest.approx(scores["knn/top1@20"])
    assert (ROOT / "mlruns").exists() == mlruns_before  # no artifacts landed in the working directory


def test_cli_bad_target_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.run", str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], proc.stderr


def test_format_table_in_percent():
    table = format_table([(500, {"knn/top1@20": 0.5}), (1000, {"knn/top1@20": 0.625, "linear/top1": 0.7})])
    assert table.splitlines()[0].split() == ["step", "knn/top1@20", "linear/top1"]
    assert table.splitlines()[1].split() == ["500", "50.00", "-"]
    assert table.splitlines()[2].split() == ["1000", "62.50", "70.00"]


def test_score_checkpoint_on_the_runs_shards(tmp_path):
    """A run trained on shards is scored on the shards named in backbone.json, equal to the same images as tensors."""
    from data.builtin import FASHION_MNIST_CLASSES
    from data.shards import write_shards

    (xtr, ytr), (xte, yte) = fashion_mnist("train"), fashion_mnist("test")
    xtr, ytr, xte, yte = xtr[:600], ytr[:600], xte[:200], yte[:200]
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        samples = ((f"{name}_{i:05d}", x[i, 0].numpy(), int(y[i])) for i in range(len(y)))
        write_shards(samples, tmp_path / name, shard_size=250, classes=FASHION_MNIST_CLASSES, prefix=name)
    ckpt = tmp_path / "ckpt"
    data = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}
    backbones.save(tiny_vit(), ckpt, extra={"step": 7, "preprocess": PREPROCESS, "data": data})
    got = score_checkpoint(ckpt, knn=True, ks=(5,))
    assert sorted(p.name for p in (ckpt / "features").iterdir())[0].startswith("shards-")
    train_feats, _ = extract_features(tiny_vit(), xtr, ytr, PREPROCESS)
    test_feats, _ = extract_features(tiny_vit(), xte, yte, PREPROCESS)
    want = knn_accuracy(train_feats, ytr, test_feats, yte, num_classes=10, ks=(5,))  # order-free: same sets
    assert got == pytest.approx({f"knn/{k}": v for k, v in want.items()})
    subset = score_checkpoint(ckpt, knn=True, ks=(5,), train_samples=100)  # a seeded random 100 of them
    assert len(list((ckpt / "features").iterdir())) == 3 and subset != got


def test_reservoir_sample_is_uniform_over_a_stream_written_class_by_class():
    from eval.run import reservoir_sample

    labels = torch.arange(10).repeat_interleave(1000)  # 10 classes, sorted, as an image folder writes them
    images = torch.arange(10_000, dtype=torch.int64)[:, None]
    stream = ((images[i : i + 256], labels[i : i + 256]) for i in range(0, 10_000, 256))
    x, y = reservoir_sample(stream, 2000, seed=0)
    assert x.shape == (2000, 1) and len(set(x[:, 0].tolist())) == 2000  # distinct samples
    assert torch.equal(labels[x[:, 0]], y)  # images and labels stay paired
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 150 and counts.max() < 250, counts  # about 200 of every class, not the first 2
    again = ((images[i : i + 256], labels[i : i + 256]) for i in range(0, 10_000, 256))
    assert torch.equal(reservoir_sample(again, 2000, seed=0)[0], x)  # seeded: the same bank every time


def test_cli_on_the_users_shards_into_a_linked_eval_run(tmp_path):
    """--train-shards/--test-shards score on the user's labelled shards; --eval-run logs into a new
    run of vit-ssl-eval whose parent tag names the pretraining run, at the checkpoint's step."""
    from data.builtin import FASHION_MNIST_CLASSES
    from data.shards import write_shards

    (xtr, ytr), (xte, yte) = fashion_mnist("train"), fashion_mnist("test")
    for name, x, y, n in (("train", xtr, ytr, 400), ("test", xte, yte, 150)):
        samples = ((f"{name}_{i:05d}", x[i, 0].numpy(), int(y[i])) for i in range(n))
        write_shards(samples, tmp_path / name, shard_size=200, classes=FASHION_MNIST_CLASSES, prefix=name)
    run_dir, run_id, uri = make_run(tmp_path, steps=(700,))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "eval.run", str(run_dir), "--knn", "--linear", "--eval-run",
           "--train-shards", str(tmp_path / "train"), "--test-shards", str(tmp_path / "test")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0].split()
    assert header[:5] == ["step", "knn/top1@10", "knn/top5@10", "knn/top1@20", "knn/top5@20"]  # k = 10 20 100 200
    assert "knn/top1@200" in header and "linear/top5" in header
    client = tracking.client(uri)
    children = client.search_runs([client.get_experiment_by_name("vit-ssl-eval").experiment_id])
    assert len(children) == 1 and children[0].data.tags[tracking.PARENT_TAG] == run_id
    child = children[0].info.run_id
    assert child in proc.stdout
    assert [m.step for m in client.get_metric_history(child, "linear/top1")] == [700]
    assert client.get_metric_history(run_id, "linear/top1") == []  # not into the pretraining run itself
    # the same scores as scoring those shards in-process (the cache is keyed by the shard names)
    ckpt = run_dir / "checkpoints" / "step-000700"
    want = score_checkpoint(ckpt, ks=(10,), shards={"train": str(tmp_path / "train"), "test": str(tmp_path / "test")})
    got = client.get_metric_history(child, "knn/top1_k10")[0].value
    assert got == pytest.approx(want["knn/top1@10"])

    bad = subprocess.run([sys.executable, "-m", "eval.run", str(run_dir), "--test-shards", str(tmp_path / "test")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--train-shards" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_an_exported_backbone_scores_like_its_checkpoint(tmp_path):
    """TARGET may be an export (python -m pretrain.export): same scores, and its run is the one it came from."""
    from pretrain.export import export

    fashion_mnist("test")
    run_dir, _, _ = make_run(tmp_path, steps=(400,))
    ckpt = run_dir / "checkpoints" / "step-000400"
    out = tmp_path / "exported"
    export(ckpt, out)
    assert find_checkpoints(out) == ([out], run_dir)
    got = score_checkpoint(out, ks=(20,), train_samples=1000)
    assert got == score_checkpoint(ckpt, ks=(20,), train_samples=1000)
    assert (out / "features" / "fmnist-train-1000.safetensors").is_file()  # cached beside the export
