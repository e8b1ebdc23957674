"""metrics.jsonl in a bucket (the emulator of conftest.py): an object cannot be appended to,
so the writer uploads the whole file at most every ``upload_every_secs`` and at each flush."""
import json

from etils import epath

from mage_jax import metrics


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in epath.Path(path).read_text().splitlines()]


def test_uploads_are_spaced_and_a_flush_or_close_sends_the_rest(gcs):
    path = f"{gcs.create_bucket('metrics')}/run/metrics.jsonl"
    clock = _Clock()
    writer = metrics.JsonlWriter(path, upload_every_secs=60.0, clock=clock)
    writer.write_scalars(1, {"loss": 3.0})
    writer.write_scalars(2, {"loss": 2.5})
    assert not epath.Path(path).exists()  # 0 s since the start: nothing uploaded yet
    clock.now = 61.0
    writer.write_scalars(3, {"loss": 2.0})  # 61 s: everything so far goes up
    assert _steps(path) == [1, 2, 3]
    clock.now = 90.0
    writer.write_scalars(4, {"loss": 1.5})  # 29 s after that upload: held back
    assert _steps(path) == [1, 2, 3]
    writer.flush()  # what the loop does before each checkpoint
    assert _steps(path) == [1, 2, 3, 4]
    writer.write_scalars(5, {"loss": 1.0})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5]

    # A resumed run continues the same object.
    writer = metrics.JsonlWriter(path, upload_every_secs=60.0, clock=clock)
    writer.write_scalars(6, {"loss": 0.5})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6]
