"""Checkpoint folders: only complete (renamed) checkpoints count, newest by step."""
from __future__ import annotations

from pretrain.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000005", "step-000100", "step-000020", ".tmp-step-000200", ".old-step-000100", "notes"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-000020", "step-000100"]
    assert latest_checkpoint(tmp_path).name == "step-000100"  # by step, not by name or time
    assert checkpoint_step(root / "step-000100") == 100
    assert latest_checkpoint(tmp_path / "nothing-here") is None
