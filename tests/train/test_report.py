"""The evaluators' lines of the end-of-run summary (mage_jax/train/report.py)."""
from mage_jax.train import report


def _records(*runs):
    return [{"step": step, "loss": 1.0, **{f"samples/{k}": v for k, v in values.items()}}
            for step, values in runs]


def test_an_evaluator_run_twice_shows_what_moved():
    lines = report._evaluator_lines(_records(
        (1000, {"fd_samples": 86.4, "fd_real": 13.4, "seconds": 12.2}),
        (2000, {"fd_samples": 40.3, "fd_real": 13.4, "seconds": 1.2})))
    assert lines == ["during     samples at step 1000 -> 2000: fd_samples 86.4 -> 40.3"]


def test_an_evaluator_run_once_shows_its_values():
    # A run shorter than the evaluator's period scores once, at its last step: nothing moved,
    # and the line must still say what was measured.
    lines = report._evaluator_lines(_records((300, {"fd_samples": 80.8, "fd_real": 13.4,
                                                    "seconds": 3.5})))
    assert lines == ["during     samples at step 300: fd_samples 80.8, fd_real 13.4"]


def test_a_non_finite_measure_is_shown_not_a_crash():
    # metrics.jsonl writes nan/inf as strings; the summary at the end of a long run must not
    # fail on them.
    lines = report._evaluator_lines(_records((1000, {"fd_samples": 86.4}),
                                             (2000, {"fd_samples": "nan"})))
    assert lines == ["during     samples at step 1000 -> 2000: fd_samples 86.4 -> nan"]
