"""The analysis notebook runs top to bottom on a small model (rollout + inversion panel)."""


def test_analysis_notebook_executes(run_notebook):
  outputs = run_notebook("analysis", VIT_JAX_INVERSION_STEPS="3")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "ViT-test: vit, 10 classes at 32px" in text
  assert "chelsea: top-5 classes" in text
  assert "rollout map (1, 4, 4) sums to" in text
  assert "inversion done: 3 layers" in text and "block_02: PSNR" in text
  pngs = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # rollout figure and inversion panel
