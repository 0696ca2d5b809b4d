"""What keeps a run from losing work: preemption signals, non-finite steps, and one rank's failure
made every rank's decision.

Exit codes of `pretrain/run.py` (the SLURM script and users' own schedulers read them):

    0   finished, or stopped at train.stop_at with a checkpoint
    1   an unexpected crash (a bug): the newest complete checkpoint is the resume point
    2   bad input (a setting, the data, a checkpoint): the message names it and the fix
    3   too many non-finite steps in a row: stopped with a checkpoint of the last good state
    75  stopped by SIGTERM or SIGUSR1 with a checkpoint of the step it finished (EX_TEMPFAIL: relaunch
        the same command to resume)
    76  stopped by SIGTERM or SIGUSR1, but train.grace_seconds ran out before the checkpoint was
        complete: the previous checkpoint is the resume point

Every decision that ends or skips a step is reduced over all processes first, so every rank takes
it at the same step and no rank waits forever in a collective the others have left.
"""
from __future__ import annotations

import os
import signal
import threading

import torch

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
EXIT_GRACE_EXPIRED = 76
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was not finite for train.max_nonfinite_steps steps in a row."""


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 instead of dying on it; the loop checks `received` between steps.

    The first signal also starts a watchdog: if the process is still running `grace_seconds` later
    (a step or a checkpoint slower than the grace period), it exits with EXIT_GRACE_EXPIRED.
    A checkpoint is written under a temporary name and renamed when complete, so that exit never
    leaves a half-written one behind as the newest.
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.received: str | None = None
        self._pid = os.getpid()
        self._disarmed = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a data worker forked from this process (a signal to the whole group):
            return  # it keeps serving batches until the trainer has checkpointed and shuts it down
        if self.received is None:
            self.received = signal.Signals(signum).name
            _say(f"[vit-ssl] {self.received}: finishing this step, then checkpointing and exiting "
                 f"(grace period {self.grace_seconds:g} s)")
            threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        if self._disarmed.wait(self.grace_seconds):
            return
        _say(f"[vit-ssl] the grace period of {self.grace_seconds:g} s ran out before the checkpoint was complete: "
             f"exiting with code {EXIT_GRACE_EXPIRED}; the previous checkpoint is the resume point")
        os._exit(EXIT_GRACE_EXPIRED)

    def disarm(self) -> None:
        """The stop's checkpoint is complete: the watchdog no longer needs to cut anything short."""
        self._disarmed.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _say(message: str) -> None:
    """Straight to stderr's file descriptor: a signal handler must not re-enter a buffered write
    (a progress bar may be in the middle of one)."""
    os.write(2, (message + "\n").encode())


def any_rank(acc, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes (one all-reduce of a few numbers; free on one process)."""
    if acc.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=acc.device)
    return [bool(v) for v in acc.reduce(t, reduction="sum").tolist()]


def is_finite(*values: torch.Tensor | float | None) -> bool:
    """True when no value is NaN or infinite (None = not measured)."""
    return all(v is None or bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
