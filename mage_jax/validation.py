"""Checks that run before anything is compiled, each naming the bad value and the fix."""
from __future__ import annotations

import os
import tempfile
import uuid

import jax
import ml_collections
from etils import epath

from mage_jax import paths, sharding
from mage_jax.data import datasets


class ConfigError(ValueError):
    """The config asks for something that cannot run."""


def validate_workdir(workdir: str) -> None:
    if not workdir:
        raise ConfigError("--workdir is required: the directory for checkpoints and metrics.")
    if paths.is_remote(workdir):
        return _validate_remote_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={workdir} is not writable ({e.strerror}). Choose a directory you can "
            f"write to, e.g. --workdir=$HOME/mage_runs/NAME.") from e


def _validate_remote_workdir(workdir: str) -> None:
    """A bucket workdir: every process writes and deletes one small object, so a missing
    bucket or missing credentials stop the run here, before anything compiles."""
    scheme, _, rest = workdir.partition("://")
    bucket = rest.split("/")[0]
    if scheme == "gs":
        fix = (f"Create the bucket (gcloud storage buckets create gs://{bucket or 'BUCKET'}) "
               f"and let this machine's account write to it (gcloud auth application-default "
               f"login, or a VM service account with roles/storage.objectAdmin on the bucket)")
    else:
        fix = f"Check that the {scheme}:// bucket exists and that this machine may write to it"
    if not bucket:
        raise ConfigError(f"--workdir={workdir} names no bucket: give {scheme}://BUCKET/RUN. "
                          f"{fix}.")
    probe = epath.Path(workdir) / f".write_test.{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    # TensorFlow's gfile raises tf.errors.OpError, gcsfs its HttpError, others OSError.
    except Exception as e:  # noqa: BLE001 -- any failure here means "cannot write"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--workdir={workdir} cannot be written ({reason}). {fix}.") from e


def validate_training_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    for key in ("total_steps", "log_every", "checkpoint_every", "batch_size", "keep_checkpoints"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key}={config[key]} must be a positive integer.")
    if config.image_summary_every < 0:
        raise ConfigError(
            f"config.image_summary_every={config.image_summary_every} must be >= 0 (0 is off).")
    if int(config.eval.num_examples) < -1:
        raise ConfigError(f"config.eval.num_examples={config.eval.num_examples} must be -1 (the "
                          f"whole evaluation split), 0 (no evaluation) or a positive count.")
    validate_workdir(workdir)
    datasets.check_dataset(config.data, config.data.train_split)
    if config.data.get("jpeg_draft", False):
        try:
            datasets.check_encoded_source(config.data)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if int(config.eval.num_examples) != 0:
        datasets.check_dataset(config.data, config.data.eval_split)


def validate_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """The global batch must split evenly over hosts and over the data-parallel devices."""
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}). Use a "
            f"multiple of {dp}, e.g. --config.batch_size={max(dp, config.batch_size // dp * dp)}.")
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{jax.process_count()} processes.")


def check_num_classes(config) -> int:
    """The class count of ``config.data``'s training split; ``config.num_classes`` (when not
    -1) must equal it. A dataset without labels fails here, before anything is compiled."""
    found = datasets.num_classes(config.data, config.data.train_split)
    wanted = int(config.num_classes)
    if wanted != -1 and wanted != found:
        raise ConfigError(
            f"config.num_classes={wanted} but {config.data.name} has {found} classes; set "
            f"--config.num_classes={found} (or -1 to take the dataset's count).")
    return found
