"""SIGTERM and Ctrl-C: save a checkpoint at the current step, then stop.

The entry point installs the handlers (``install()``); the training loop asks
``requested()`` after every step and, when a signal came, saves the state it has, waits
for the save and returns. Exit status, set by the entry point: 0 after SIGTERM (a
preemption notice: the job is done for now and resumes from that checkpoint), 130 after
Ctrl-C (the shell's convention for SIGINT). A second Ctrl-C exits at once with 130: the
checkpoint being written then is abandoned, and orbax only finalises a step's directory
after it is complete, so the newest complete one is what the next run restores.
"""
from __future__ import annotations

import os
import signal
import sys

INTERRUPTED_STATUS = 130  # 128 + SIGINT
# The stages whose loop (mage_jax/train/loop.py) checks after every step; the others
# (sampling, few-shot, the cached probe) keep Python's default: Ctrl-C stops at once.
STAGES = ("tokenizer", "pretrain", "finetune")

_received: int | None = None


def _handle(signum, frame) -> None:
    del frame
    global _received
    if _received is None:
        _received = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, "
                         f"then stopping{' (Ctrl-C again to quit at once)' if signum == signal.SIGINT else ''}.\n")
        return
    if signum == signal.SIGINT:
        sys.stderr.write("\nSecond Ctrl-C: quitting now; the newest complete checkpoint stays.\n")
        sys.stderr.flush()
        os._exit(INTERRUPTED_STATUS)


def install() -> None:
    """SIGTERM and SIGINT request a stop after the current step (main thread only)."""
    global _received
    _received = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handle)


class Stopped(Exception):
    """Raised between stages (e.g. after the tokenizer a pretraining run trains first) when
    a stop was requested: the stage that stopped has saved its checkpoint."""


def raise_if_requested(where: str) -> None:
    if _received is not None:
        raise Stopped(f"stopped by {signal.Signals(_received).name} {where}")


def requested() -> bool:
    return _received is not None


def received() -> int | None:
    """The first signal received since ``install()``, or None."""
    return _received


def exit_status() -> int:
    return INTERRUPTED_STATUS if _received == signal.SIGINT else 0
