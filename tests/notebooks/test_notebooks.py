"""The notebooks run top to bottom at smoke size (MAGE_NOTEBOOK_SMOKE=1), as in Colab.

The train notebook trains the demo (tokenizer, MAGE, samples), probes and samples it; the
quickstart then loads that run (MAGE_WORKDIR) and reconstructs, samples, edits and scores
few-shot features from it. Both execute in a real Jupyter kernel (nbclient), from the
repository root, offline.
"""
import json
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _read(path):
    return nbformat.read(path, as_version=4)


def test_there_are_the_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["mage_quickstart.ipynb", "mage_train_small.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    """Committed notebooks carry no outputs (they would go stale and bloat the diffs)."""
    for cell in _read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_cell_says_what_it_is_for(path):
    """Each code cell follows a one-line markdown cell saying its purpose."""
    cells = _read(path).cells
    for before, cell in zip(cells, cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_only_the_package(path):
    """No logic of their own: no function from a private module or name."""
    source = "\n".join(c.source for c in _read(path).cells if c.cell_type == "code")
    assert not re.search(r"\b(?:inference|mage_main|config_files)\._", source)
    assert not re.search(r"from mage_jax\.\w+(\.\w+)* import _", source)


def _outputs_text(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or json.dumps(output.get("data", {}).get(
                "text/plain", "")))
    return "\n".join(texts)


def _execute(name: str):
    notebook = _read(REPO / "notebooks" / f"{name}.ipynb")
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return notebook


def test_both_notebooks_run_offline_at_smoke_size(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MAGE_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MAGE_WORKDIR", str(run))
    monkeypatch.setenv("MAGE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAGE_WEIGHTS", raising=False)
    # A user's kernel: the devices there are (one CPU here), not the tests' 8 simulated ones.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("XLA_FLAGS", flags)

    trained = _execute("mage_train_small")
    text = _outputs_text(trained)
    assert "finished at step 20" in text
    for name in ("reconstructions.png", "predictions.png", "generate/samples_grid.png",
                 "tokenizer/metrics.jsonl", "probe/metrics.jsonl", "samples/samples.npz"):
        assert (run / name).exists(), name
    assert re.search(r"'fd_samples': [\d.]+, 'fd_real': [\d.]+, 'fd_random_tokens'", text)
    assert re.search(r"'top1': 0\.\d+", text)
    figures = [o for c in trained.cells for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) >= 4  # the metrics plot and the three pictures

    quick = _execute("mage_quickstart")
    text = _outputs_text(quick)
    assert f"{run}: step 20, 32 px, 8x8 tokens, encoder width 128" in text
    assert "tokens: (8, 64)" in text and "features: (4, 128)" in text
    assert re.search(r"10shot: \d+\.\d%", text)
    assert "this MAGE is unconditional" in text
    figures = [o for c in quick.cells for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # reconstructions, samples, edits


def test_readme_and_notebooks_name_the_repository_of_setup_py():
    """One repository URL (setup.py's): the install cell clones it, the badges open it."""
    url = re.search(r'url="(https://github\.com/[^"]+)"', (REPO / "setup.py").read_text()).group(1)
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        source = "\n".join(c.source for c in _read(path).cells)
        assert f'REPO_URL = "{url}"' in source
        badge = (f"https://colab.research.google.com/github/{url.split('github.com/')[1]}"
                 f"/blob/main/notebooks/{path.name}")
        assert badge in readme, badge
