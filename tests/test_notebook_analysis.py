"""The analysis notebook runs top to bottom on a small model (rollout + inversion panel)."""
import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv("VIT_JAX_MODEL", "ViT-test")
  monkeypatch.setenv("VIT_JAX_IMG_SIZE", "32")
  monkeypatch.setenv("VIT_JAX_INVERSION_STEPS", "3")
  monkeypatch.delenv("VIT_JAX_CHECKPOINT", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "ViT-test: vit, 10 classes at 32px" in text
  assert "chelsea: top-5 classes" in text
  assert "rollout map (1, 4, 4) sums to" in text
  assert "inversion done: 3 layers" in text and "block_02: PSNR" in text
  pngs = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # rollout figure and inversion panel
