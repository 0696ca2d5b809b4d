"""The objective x backbone matrix (objectives/matrix.py): every registered backbone (and a timm
ViT and CNN) with every objective either takes a training step (finite loss, a gradient on every
trainable parameter) or is refused at construction with the capability error."""
from __future__ import annotations

import pytest

import backbones
from objectives import list_objectives, objective_class
from objectives.matrix import build_row, matrix_backbones, run_cell

HIERARCHICAL = ["max_vit", "mobile_vit", "twins_svt", "scalable_vit"]
NO_TOKEN_DROP = {"efficient linformer", "vivit factorized_self_attention"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.mark.parametrize("objective", list_objectives())
@pytest.mark.parametrize("backbone", matrix_backbones())
def test_every_pair_trains_or_is_refused_by_capability(backbone, objective, teachers):
    cell = run_cell(backbone, objective, teachers)
    assert cell.status in ("ok", "n/a"), cell.detail
    bb = build_row(backbone)
    # refused exactly when a required capability is missing
    assert (cell.status == "ok") == objective_class(objective).serves(bb), cell.detail


@pytest.mark.parametrize("backbone", matrix_backbones())
def test_the_cells_that_make_sense_are_filled(backbone):
    """DINO, supervised and distillation need only the pooled embedding: they serve every backbone.
    MAE serves every backbone that can drop tokens; SimMIM every hierarchical one."""
    bb = build_row(backbone)
    for objective in ("dino", "supervised", "distill"):
        assert objective_class(objective).serves(bb)
    if bb.supports_token_access:
        assert bb.supports_mask_token, f"{backbone}: token access but no mask token"
        # MAE on every token backbone, except where a subset of tokens cannot run: a fixed-length
        # mixer (Linformer) and attention split per time step (ViViT)
        assert bb.supports_token_drop or backbone in NO_TOKEN_DROP, f"{backbone}: token access but no token drop"
    if backbone in HIERARCHICAL:
        assert bb.supports_mask_token, f"{backbone} is hierarchical: SimMIM should serve it"


def test_every_family_of_the_issue_is_registered():
    want = {"vit", "simple_vit", "cait", "deepvit", "cross_vit", "max_vit", "mobile_vit", "twins_svt", "scalable_vit",
            "small_data_vit", "efficient", "vit_3d", "simple_vit_3d", "vivit", "navit", "vit_1d"}
    assert want <= set(backbones.list_backbones())
