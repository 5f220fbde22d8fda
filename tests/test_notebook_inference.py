"""The inference notebook runs top to bottom: on its default, the digits-trained ViT
(trained here through the main job's CLI, for a few steps), and on a published-layout file."""
import os
import re


def _pngs(outputs):
  return [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]


def test_inference_notebook_classifies_the_held_out_digits_by_default(run_notebook):
  outputs = run_notebook("inference")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "ViT-test 10 classes at 32px, trained on digits, " in text
  here, main_job = map(float, re.search(
      r"test accuracy here: ([\d.]+)% of 296 \(the main job's evaluation: ([\d.]+)%\)", text).groups())
  assert abs(here - main_job) <= 0.35  # the same images as the main job's test split (one may flip)
  assert len(re.findall(r"digit \d: top-5", text)) == 8
  assert "exported and reloaded:" in text and _pngs(outputs)


def test_inference_notebook_on_a_published_layout_file(run_notebook):
  # A path relative to the repository root, as a user of the README writes
  # it; the notebook itself runs in another directory.
  outputs = run_notebook("inference", VIT_JAX_CHECKPOINT="tests/fixtures/vit_jax_export.npz")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "vit_jax_export 5 classes at 16px" in text  # architecture from the file
  for photo in ("astronaut", "coffee", "chelsea"):
    assert f"{photo}: top-5" in text
  exported = re.search(r"exported and reloaded: (\S+)", text).group(1)
  assert not os.path.exists(exported)  # the temporary export is removed
  assert _pngs(outputs)


def test_inference_notebook_says_where_it_looked_for_a_missing_checkpoint(run_notebook):
  import nbclient
  import pytest
  with pytest.raises(nbclient.exceptions.CellExecutionError,
                     match=r"(?s)'no/such\.npz' not found: looked in .* and in the repository root"):
    run_notebook("inference", VIT_JAX_CHECKPOINT="no/such.npz")
