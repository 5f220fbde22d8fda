"""The analysis notebook runs top to bottom on its default, the digits-trained ViT (trained
here through the main job's CLI, for a few steps): rollout and inversion panel."""
import re


def test_analysis_notebook_executes(run_notebook):
  outputs = run_notebook("analysis", VIT_JAX_INVERSION_STEPS="3")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "ViT-test: vit, 10 classes at 32px, patch grid (4, 4), trained on digits, " in text
  assert re.search(r"digit \d: top-3 classes \[\(\d, 0\.\d+\)", text)
  share = float(re.search(r"rollout map \(1, 4, 4\) sums to ([\d.]+)", text).group(1))
  assert 0 < share <= 1  # the class token's row over the patches (the rest stays on itself)
  assert "inversion done: 5 layers" in text and "block_04: PSNR" in text
  pngs = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # rollout figure and inversion panel
