"""metrics.jsonl after a kill: a line cut short is dropped, not glued to the next run's."""
import json

from mage_jax import metrics


def test_a_partial_last_line_is_dropped_when_the_next_run_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    writer = metrics.JsonlWriter(str(path))
    writer.write_scalars(2, {"loss": 1.5})
    writer.close()
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0},
                                                    {"step": 2, "loss": 1.5}]
    writer = metrics.JsonlWriter(str(path))  # a whole file is left as it is
    writer.close()
    assert path.read_text().count("\n") == 2
