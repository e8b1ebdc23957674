"""benchmarks/matmul_rate.py: the record it writes and the message a malformed shape gets."""
import glob
import json
import os
import subprocess
import sys

import pytest

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks")
SCRIPT = os.path.join(_BENCHMARKS, "matmul_rate.py")


def _run(*flags):
    return subprocess.run([sys.executable, SCRIPT, *flags], check=False, capture_output=True,
                          text=True, timeout=300)


def test_writes_the_rate_of_each_shape(tmp_path):
    proc = _run("--shapes=64x32x16,8x8x8", "--work=1e6", "--repeats=2",
                f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    (path,) = glob.glob(str(tmp_path / "*_matmul_rate.json"))
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    assert [r["shape"] for r in result["results"]] == [[64, 32, 16], [8, 8, 8]]
    for r in result["results"]:
        m, k, n = r["shape"]
        # The rate is the product's FLOPs over the best time, not some other count.
        assert r["gflops_per_s"] == pytest.approx(2 * m * k * n / r["seconds"] / 1e9)
        assert r["calls"] >= 3
    assert result["machine"]["platform"] == "cpu"
    assert "64x32x16:" in proc.stdout


@pytest.mark.parametrize("bad", ["64x32", "64x0x16", "axbxc"])
def test_a_malformed_shape_is_named(tmp_path, bad):
    proc = _run(f"--shapes=8x8x8,{bad}", f"--output_dir={tmp_path}")
    assert proc.returncode != 0
    assert f"--shapes entry '{bad}' is not MxKxN" in proc.stderr
    assert not os.listdir(tmp_path)
