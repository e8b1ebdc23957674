"""benchmarks/compare_official.py without the official checkout: the bad-input paths (exit 2
and one line, before anything heavy) and the parent's pure parsing, summary and record."""
import json
import os
import subprocess
import sys

import pytest

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, _BENCHMARKS)

import compare_official  # noqa: E402
import record  # noqa: E402

SCRIPT = os.path.join(_BENCHMARKS, "compare_official.py")


def _run(*flags):
    return subprocess.run([sys.executable, SCRIPT, *flags], check=False, capture_output=True,
                          text=True, timeout=300)


def _checkout_layout(root):
    """The files the parent looks for (empty: nothing here is run)."""
    os.makedirs(os.path.join(root, "config"))
    for name in compare_official.OFFICIAL_FILES:
        open(os.path.join(root, name), "w").close()
    return str(root)


def test_wrong_repo_is_one_line_and_exit_2(tmp_path):
    proc = _run(f"--official_repo={tmp_path}", "--official_python=/no/such/python")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"--official_repo={tmp_path} has no models_mage.py" in lines[0]
    assert "https://github.com/LTH14/mage" in lines[0]
    assert "official_python" not in lines[0]  # the repo is checked first, alone
    assert proc.stdout == ""


@pytest.mark.parametrize("python", ["/no/such/python", "/bin/false"])
def test_wrong_python_is_one_line_and_exit_2(tmp_path, python):
    repo = _checkout_layout(tmp_path / "mage")
    proc = _run(f"--official_repo={repo}", f"--official_python={python}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --official_python={python} cannot ")
    assert "torch, torchvision, timm" in lines[0]
    assert proc.stdout == ""


def test_missing_required_flag_exits_2():
    proc = _run("--official_python=/bin/false")
    assert proc.returncode == 2
    assert "--official_repo is required" in proc.stderr


def test_repo_check_accepts_a_checkout_layout(tmp_path):
    assert compare_official.check_official_repo(_checkout_layout(tmp_path / "mage")) is None
    missing = compare_official.check_official_repo(str(tmp_path))
    assert "models_mage.py, gen_img_uncond.py, config/vqgan.yaml" in missing


def test_parse_worker_output_takes_the_last_result_line():
    stdout = ("Working with z of shape (1, 256, 16, 16)\n"
              'COMPARE_RESULT {"images_per_sec": 1.5}\n'
              "noise\n"
              'COMPARE_RESULT {"images_per_sec": 2.5, "step_seconds": [3.2]}\n')
    assert compare_official.parse_worker_output(stdout) == {"images_per_sec": 2.5,
                                                             "step_seconds": [3.2]}
    with pytest.raises(ValueError, match="no line"):
        compare_official.parse_worker_output("Restored from x.ckpt\n")
    with pytest.raises(ValueError, match="positive images_per_sec"):
        compare_official.parse_worker_output('COMPARE_RESULT {"images_per_sec": 0}\n')


def _rounds(official, ours):
    return [{"official": {"images_per_sec": a}, "ours": {"images_per_sec": b}}
            for a, b in zip(official, ours)]


def test_summarize_odd_rounds():
    s = compare_official.summarize(_rounds([2.0, 4.0, 3.0], [12.0, 6.0, 9.0]))
    assert s["official"] == {"images_per_sec": [2.0, 4.0, 3.0], "median": 3.0}
    assert s["ours"] == {"images_per_sec": [12.0, 6.0, 9.0], "median": 9.0}
    assert s["ratio_ours_over_official"] == pytest.approx(3.0)


def test_summarize_even_rounds_and_slower_ours():
    s = compare_official.summarize(_rounds([1.0, 3.0], [0.5, 1.5]))
    assert s["official"]["median"] == 2.0
    assert s["ours"]["median"] == 1.0
    assert s["ratio_ours_over_official"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        compare_official.summarize([])


def test_round_order_alternates():
    assert [compare_official.round_order(i) for i in range(3)] == [
        ("official", "ours"), ("ours", "official"), ("official", "ours")]


def test_record_and_table(tmp_path):
    args = compare_official._parser().parse_args([
        f"--official_repo={tmp_path}", "--official_python=/venv/bin/python",
        "--workload=sample", "--rounds=2", "--batch_size=2", "--num_iter=3"])
    worker = {"official": {"images_per_sec": 1.0, "threads": 2,
                           "versions": {"torch": "2.0", "timm": "1.0.31"}},
              "ours": {"images_per_sec": 3.0, "xla_flags": "",
                       "versions": {"jax": "0.10", "jaxlib": "0.10", "flax": "0.12"}}}
    rounds = [worker, {"official": dict(worker["official"], images_per_sec=3.0),
                       "ours": dict(worker["ours"], images_per_sec=5.0)}]
    results = {"sample": {"rounds": rounds, "summary": compare_official.summarize(rounds)}}
    rec = compare_official.build_record(args, results, {"omegaconf": "2.3"},
                                        {"platform": "cpu"})
    assert rec["results"]["sample"]["summary"]["official"]["median"] == 2.0
    assert rec["results"]["sample"]["summary"]["ours"]["median"] == 4.0
    assert rec["results"]["sample"]["summary"]["ratio_ours_over_official"] == 2.0
    assert rec["official"]["versions"] == {"omegaconf": "2.3", "torch": "2.0",
                                           "timm": "1.0.31"}
    assert rec["ours"]["versions"]["jax"] == "0.10"
    assert rec["settings"]["batch_size"] == 2 and rec["settings"]["num_iter"] == 3
    assert rec["machine"] == {"platform": "cpu"}
    row = rec["table"].splitlines()[2]
    assert row.startswith("| sample | vit_b / mage_vit_base_patch16, batch 2, 3 decoding")
    assert "| 2 | 4 | 2x | 1, 3 | 3, 5 |" in row
    path = record.write(str(tmp_path / "out"), "compare_official_sample", rec)
    assert path.endswith("_compare_official_sample.json")
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["results"]["sample"]["summary"]["ratio_ours_over_official"] == 2.0
    assert record.write("", "compare_official_sample", rec) is None
