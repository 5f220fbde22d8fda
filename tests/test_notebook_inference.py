"""The inference notebook runs top to bottom (on a small checkpoint)."""
import os
import re


def test_inference_notebook_executes(run_notebook):
  # A path relative to the repository root, as a user of the README writes
  # it; the notebook itself runs in another directory.
  outputs = run_notebook("inference", VIT_JAX_MODEL="",
                         VIT_JAX_CHECKPOINT="tests/fixtures/vit_jax_export.npz")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "vit_jax_export 5 classes at 16px" in text  # architecture from the file
  for photo in ("astronaut", "coffee", "chelsea"):
    assert f"{photo}: top-5" in text
  exported = re.search(r"exported and reloaded: (\S+)", text).group(1)
  assert not os.path.exists(exported)  # the temporary export is removed
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs)


def test_inference_notebook_says_where_it_looked_for_a_missing_checkpoint(run_notebook):
  import nbclient
  import pytest
  with pytest.raises(nbclient.exceptions.CellExecutionError,
                     match=r"(?s)'no/such\.npz' not found: looked in .* and in the repository root"):
    run_notebook("inference", VIT_JAX_MODEL="", VIT_JAX_CHECKPOINT="no/such.npz")
