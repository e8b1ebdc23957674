"""Orbax checkpoints of the train state and the data iterator's position.

One `CheckpointManager` per run, asynchronous, keeping the newest N. The state is saved
with its shardings and restored onto whatever mesh the new run has (8 devices -> 1 and
back). The grain iterator state is saved beside it, so a resumed run reads exactly the
batches the uninterrupted run would have.
"""
from __future__ import annotations

import logging as std_logging
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mage_jax import paths


class CheckpointMismatchError(ValueError):
    """A checkpoint in the workdir does not fit the model the config builds."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: a full disk, a quota, a path that turned read-only."""


# What the storage layers (tensorstore, the OS) say when a write fails, as users know it.
_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "File too large",
                   "Permission denied", "Read-only file system")


class _QuietReadOnlyOpens(std_logging.Filter):
    """Orbax warns at every read-only open ("Given directory is read only"); reading a
    finished run is what the generate, probe and few-shot stages and the notebooks do."""

    def filter(self, record):
        return not str(record.msg).startswith("Given directory is read only")


std_logging.getLogger("absl").addFilter(_QuietReadOnlyOpens())


class Checkpointer:

    def __init__(self, workdir: str, *, keep: int | None = None, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.join(paths.absolute(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=not read_only,
                read_only=read_only,
                save_interval_steps=0 if read_only else 1,  # (orbax warns otherwise)
                # A step a killed run left half-written (`<step>.orbax-checkpoint-tmp`) is
                # never restored; a run that writes here removes it on start.
                cleanup_tmp_directories=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once any host received a preemption notice (multi-host runs)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:  # also where the previous (asynchronous) save's failure comes out
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError for I/O)
            raise self._write_failed(e) from e

    def _write_failed(self, error: BaseException) -> CheckpointWriteError:
        """The failure in one line, with the step that is still intact: a save is written
        under ``<step>.orbax-checkpoint-tmp`` and only renamed once complete."""
        text = " ".join(str(error).split())
        reason = next((f for f in _WRITE_FAILURES if f in text), text[:200])
        newest = self._manager.latest_step()
        kept = (f"the newest complete checkpoint, step {newest}, is intact" if newest else
                "no checkpoint was completed before")
        return CheckpointWriteError(
            f"could not write a checkpoint under {self.directory} ({reason}); {kept}. Free "
            f"space there (or make it writable) and run the same command to resume.")

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
        saved = self._manager.item_metadata(step)["state"]
        saved_by_name = _by_name(saved)
        want_by_name = _by_name(abstract_state)
        # Parameters first: the error should name `params/...`, not its optimizer moment.
        for name, want in sorted(want_by_name.items(),
                                 key=lambda kv: not kv[0].startswith("params/")):
            got = saved_by_name.get(name)
            if got is None:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} has no entry {name}, which this config's "
                    f"model needs. The checkpoint was written by another model or stage: point "
                    f"--workdir at a fresh directory, or use the config the checkpoint came from.")
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} has {name} of shape {tuple(got.shape)} but "
                    f"this config builds {tuple(want.shape)}. Use the config the checkpoint was "
                    f"written with (its workdir has config.json), or a fresh --workdir.")
        extra = set(saved_by_name) - set(want_by_name)
        if extra:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} has entries this config's model lacks, e.g. "
                f"{sorted(extra)[:3]}: point --workdir at a fresh directory or use the config the "
                f"checkpoint was written with.")

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        # A run that read with worker processes saved no iterator state (its position is
        # its step): nothing to restore into a threaded reader then.
        if data_iterator is not None and epath.Path(self.directory, str(step), "data").exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _by_name(tree) -> dict[str, Any]:
    """Leaves by a path name that reads the same for a live tree and orbax's metadata tree
    (which stores tuples and named tuples as lists/dicts)."""
    def part(key):
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(part(k) for k in path): leaf for path, leaf in flat}


def restore_params(workdir: str, step: int | None = None, ema: bool = True
                   ) -> tuple[dict, int]:
    """The params of a finished run's checkpoint (e.g. the tokenizer for pretraining), on host.

    Returns (params, step): the run's ``ema_params`` (a tokenizer trained with MaskGIT's
    weight average) unless ``ema`` is False or the run kept none, else its ``params``.
    Reads only the ``state`` item, replicated onto the default device.
    """
    checkpointer = Checkpointer(workdir, async_save=False, read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint under {checkpointer.directory}: train that stage first (its "
            f"--workdir), or give converted official weights.")
    metadata = checkpointer._manager.item_metadata(step)["state"]
    # Onto this host's first device: every host reads the whole tree (frozen params).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=local), metadata,
        is_leaf=lambda x: hasattr(x, "shape"))
    state = checkpointer._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    checkpointer.close()
    get = state.get if isinstance(state, dict) else lambda k: getattr(state, k, None)
    params = (ema and get("ema_params")) or get("params")
    return jax.tree.map(np.asarray, params), step
