"""Every notebook runs top to bottom in a short mode, and the collapse study shows the paper's finding; each opens
with what it teaches and its time, and finds the project from wherever it is opened."""
import json
import sys

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import ROOT, load

SHORT = {  # parameter-cell overrides that keep each notebook to well under a minute
    "tour.ipynb": "STEPS = 5",
}  # emergence.ipynb: in its own test below  # attention_maps.ipynb: in its own test below


def execute(name, overrides, extra_cells=()):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source + "\n" + overrides  # later assignments win
    nb.cells += [nbformat.v4.new_code_cell(src) for src in extra_cells]
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return nb


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_opens_with_what_it_teaches_its_time_and_its_size_switch():
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        intro, params = cells[0].source, next(c for c in cells if "parameters" in c.metadata.get("tags", [])).source
        assert "**What it teaches**" in intro and "**Time**" in intro and "2-core CPU" in intro, path.name
        assert 'SIZE = "gpu" if DEVICE.type == "cuda" else "cpu"' in params, path.name


def test_every_notebook_finds_the_project_from_wherever_it_is_opened(tmp_path, monkeypatch, capsys):
    first = {path.name: next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
             for path in NOTEBOOKS}
    assert len(set(first.values())) == 1, "the notebooks open with the same cell"
    cell = first["tour.ipynb"]
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the project on it
    (tmp_path / "dino").symlink_to(ROOT)  # a clone beside the notebook, as after `git clone` in a cloud notebook
    for where, found in [(ROOT / "notebooks", ROOT), (ROOT, ROOT), (tmp_path, tmp_path / "dino")]:
        monkeypatch.chdir(where)
        scope = {}
        exec(cell, scope)
        assert scope["ROOT"] == found and scope["DEVICE"] == load("runtime").pick_device(0)
        assert capsys.readouterr().out.startswith(f"device {scope['DEVICE']}, precision {scope['PRECISION']}: ")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match=r"clone the repository, `pip install -r requirements.txt` in it"):
        exec(cell, {})


@pytest.mark.parametrize("name", sorted(SHORT))
def test_notebook_runs(name):
    execute(name, SHORT[name])


SHORT_COLLAPSE = "STEPS = 150"


def test_collapse_ablations_show_the_papers_finding():
    nb = execute("collapse_ablations.ipynb", SHORT_COLLAPSE,
                 ["import json; print(json.dumps({'results': results, 'log_k': float(LOG_K)}))"])
    out = json.loads(nb.cells[-1].outputs[0]["text"])
    r, log_k = out["results"], out["log_k"]
    assert abs(r["centering only"]["entropy"] - log_k) <= 0.1 * log_k  # uniform collapse
    assert r["sharpening only"]["entropy"] < 0.1 * log_k  # one dimension dominates
    assert r["full DINO"]["kl"] > r["centering only"]["kl"] and r["full DINO"]["kl"] > r["sharpening only"]["kl"]
    collapsed = [v["knn"] for n, v in r.items() if n not in ("full DINO", "random init")]
    assert r["full DINO"]["knn"] > max(sum(collapsed) / 3, r["random init"]["knn"]), r  # better features


def test_attention_notebook_draws_fig1_from_the_hub_cache(tmp_path, monkeypatch):
    """The released ViT-S/8 found in torch.hub's cache (random weights in its format here) is drawn, unasked."""
    torch.manual_seed(0)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(load("02_vit").vit_small(patch_size=8).state_dict(),
               tmp_path / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the kernel inherits it
    nb = execute("attention_maps.ipynb", 'CHECKPOINT = "none"\nSTEPS = 5\nOFFICIAL = "dino_vits8"\nOFFICIAL_SIZE = 64')
    assert sum("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs) == 2  # one figure per photograph


def test_emergence_notebook_measures_three_networks():
    """Trained here for a few steps: DINO, the supervised baseline and random init are each scored, the Jaccard
    of their attention masks and J mean of their label propagation, and the figures drawn."""
    nb = execute("emergence.ipynb", "STEPS = 12\nEVAL_EVERY = 6\nEVAL_IMAGES = 48\nFIGURE_IMAGES = 3")
    out = json.loads(nb.cells[-1].outputs[0]["text"].splitlines()[0])
    assert set(out) == {"DINO", "supervised", "random init"}
    assert all(0 < r["jaccard"] < 100 and 0 < r["j_mean"] <= 100 for r in out.values()), out
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 5
