"""Metric writers: TensorBoard (clu) plus one JSON object per logged step in metrics.jsonl.

Only process 0 writes files; other hosts log to stdout, so a pod run leaves one clean record.
metrics.jsonl goes through etils.epath (mage_jax/paths.py), so a ``gs://`` workdir holds it;
TensorBoard's events go through TensorFlow's own file systems.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from mage_jax import paths

# clu's writers import TensorFlow (seconds, and absent on some accelerator images): the
# modules a train step is built from (train/loop.py, train/report.py) import this file
# only where they write or read metrics, so the planner and the benchmarks never load it.


class JsonlWriter(interface.MetricWriter):
    """Appends ``{"step": s, name: value, ...}`` lines for scalars; other kinds are skipped.

    Lines are appended, so a resumed run continues the same file; a reader keeps the last
    line of each step if a crash made a step appear twice. An object in a bucket cannot be
    appended to: there the whole file is uploaded again, at most every ``upload_every_secs``
    and at each ``flush`` (the loop flushes before every checkpoint, so a run killed between
    uploads loses only lines that its resumed run logs again). Uploading at every logged
    step would send a long run's whole log thousands of times.
    """

    def __init__(self, path: str, upload_every_secs: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._path = epath.Path(path)
        _drop_partial_last_line(path)
        if paths.is_remote(path):
            self._file = None
            self._text = paths.read_text(path) if self._path.exists() else ""
            self._upload_every_secs, self._clock = upload_every_secs, clock
            self._uploaded_at, self._pending = clock(), False
        else:
            self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(np.asarray(value))
            record[name] = value if math.isfinite(value) else str(value)
        line = json.dumps(record) + "\n"
        if self._file is None:
            self._text += line
            self._pending = True
            if self._clock() - self._uploaded_at >= self._upload_every_secs:
                self._upload()
        else:
            self._file.write(line)
            self._file.flush()

    def _upload(self):
        self._path.write_text(self._text, encoding="utf-8")
        self._uploaded_at, self._pending = self._clock(), False

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        if self._file is not None:
            self._file.flush()
        elif self._pending:
            self._upload()

    def close(self):
        if self._file is not None:
            self._file.close()
        else:
            self.flush()


def _drop_partial_last_line(path: str) -> None:
    """A process killed while writing a line leaves it without its newline; the next run's
    first line would be glued to it. Cut it off (its step is logged again on resume)."""
    if not paths.exists(path):
        return
    if paths.is_remote(path):  # objects are replaced whole
        data = epath.Path(path).read_bytes()
        if data and not data.endswith(b"\n"):
            epath.Path(path).write_bytes(data[:data.rfind(b"\n") + 1])
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(None, just_logging=True)
    tensorboard = metric_writers.create_default_writer(workdir, asynchronous=True)
    return metric_writers.MultiWriter(
        [tensorboard, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_metrics(workdir: str) -> list[dict]:
    """The records of metrics.jsonl, the last one of each step (see JsonlWriter)."""
    by_step: dict[int, dict] = {}
    for line in paths.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
