"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Features are L2-normalised, neighbours are the k train samples of highest cosine similarity, and
each neighbour votes for its label with weight exp(similarity / T). Similarities are computed in
tiles of (test chunk x train chunk) with a running top-k, so memory stays bounded whatever the
numbers of train and test samples: a 60,000 x 10,000 similarity matrix is never materialised.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

TRAIN_CHUNK = 8192  # train columns per tile: 512 x 8192 fp32 similarities = 16 MiB (cache-friendly; measured fastest)


def _check_inputs(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int, num_classes: int
) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, D); got train {tuple(train_feats.shape)} and test {tuple(test_feats.shape)}: "
            f"flatten them first (einops.rearrange(x, 'n ... -> n (...)'))"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train features have D={train_feats.shape[1]} but test features D={test_feats.shape[1]}: "
            f"extract both with the same backbone"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"train_labels has shape {tuple(train_labels.shape)}, expected ({train_feats.shape[0]},): one label per train row"
        )
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(
            f"train labels span [{train_labels.min().item()}, {train_labels.max().item()}] but "
            f"num_classes={num_classes}: labels must lie in [0, num_classes)"
        )
    if not (torch.isfinite(train_feats).all() and torch.isfinite(test_feats).all()):
        raise ValueError("features contain NaN or inf: check the backbone (did training diverge?)")
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of train samples ({train_feats.shape[0]}): lower k")


def nearest_neighbours(
    train_feats: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    chunk_size: int = 512,
    train_chunk_size: int = TRAIN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (N_test, k), sorted descending, and the train indices (N_test, k) of the k nearest.

    Works tile by tile and merges each tile's top-k into a running top-k, which is exact.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    sims_out, idx_out = [], []
    for t0 in range(0, test.shape[0], chunk_size):
        q = test[t0 : t0 + chunk_size]
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for c0 in range(0, train.shape[0], train_chunk_size):
            s = q @ train[c0 : c0 + train_chunk_size].T  # (chunk, train_chunk)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + c0], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def _vote(
    sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (N, num_classes): each neighbour adds exp(sim / T) to its label's score."""
    neighbour_labels = train_labels.to(idx.device)[idx]  # (N, k)
    weights = (sims / temperature).exp()
    scores = sims.new_zeros(sims.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Weighted kNN class scores (N_test, num_classes) for each test row (argmax = prediction)."""
    _check_inputs(train_feats, train_labels, test_feats, k, num_classes)
    sims, idx = nearest_neighbours(train_feats, test_feats, k, chunk_size)
    return _vote(sims, idx, train_labels, num_classes, temperature)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (k capped at the number of classes)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.to(scores.device)[:, None]).any(dim=1)
    return hits.float().mean().item()


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) for every k in `ks`, from one top-max(k) neighbour search.

    Returns e.g. {"top1@20": 0.853, "top5@20": 0.99}; with fewer than 5 classes top-5 is 1.0.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks:
        raise ValueError("ks is empty: pass at least one k, e.g. ks=(20,)")
    _check_inputs(train_feats, train_labels, test_feats, ks[-1], num_classes)
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"test_labels has shape {tuple(test_labels.shape)}, expected ({test_feats.shape[0]},): one label per test row"
        )
    sims, idx = nearest_neighbours(train_feats, test_feats, ks[-1], chunk_size)
    out: dict[str, float] = {}
    for k in ks:  # neighbours come sorted, so the first k columns are the top-k
        scores = _vote(sims[:, :k], idx[:, :k], train_labels, num_classes, temperature)
        out[f"top1@{k}"] = topk_correct(scores, test_labels, 1)
        out[f"top5@{k}"] = topk_correct(scores, test_labels, 5)
    return out
