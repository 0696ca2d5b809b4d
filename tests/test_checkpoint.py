"""Checkpoint folders: only complete (renamed) checkpoints count, newest by step."""
from __future__ import annotations

from pretrain.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints, remove_stale


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000005", "step-000100", "step-000020", ".tmp-step-000200", ".old-step-000100", "notes"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-000020", "step-000100"]
    assert latest_checkpoint(tmp_path).name == "step-000100"  # by step, not by name or time
    assert checkpoint_step(root / "step-000100") == 100
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_a_relaunch_cleans_up_what_a_kill_during_a_write_left(tmp_path):
    """.tmp-* (incomplete) and .del-* (rotated out) go; a .old-step-N whose step-N is missing (killed
    between the two renames of a replacement) comes back as step-N; a .old-step-N beside its step-N goes."""
    root = tmp_path / "checkpoints"
    for name in ("step-000004", ".old-step-000004", ".old-step-000008", ".tmp-step-000012", ".del-step-000002"):
        (root / name).mkdir(parents=True)
        (root / name / "marker").write_text(name)
    remove_stale(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000008"]
    assert (root / "step-000008" / "marker").read_text() == ".old-step-000008"
    assert (root / "step-000004" / "marker").read_text() == "step-000004"
