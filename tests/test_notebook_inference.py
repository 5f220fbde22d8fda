"""The inference notebook runs top to bottom (on a small model)."""

import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "inference.ipynb"


def test_inference_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv("VIT_JAX_MODEL", "ViT-test")
  monkeypatch.setenv("VIT_JAX_IMG_SIZE", "32")
  monkeypatch.delenv("VIT_JAX_CHECKPOINT", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  assert "ViT-test 1000 classes at 32px" in text
  for photo in ("astronaut", "coffee", "chelsea"):
    assert f"{photo}: top-5" in text
  assert "exported and reloaded" in text
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", []))
