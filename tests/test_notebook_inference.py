"""The inference notebook runs top to bottom (on a small model)."""


def test_inference_notebook_executes(run_notebook):
  outputs = run_notebook("inference")
  text = "\n".join(o.get("text", "") for o in outputs)
  assert "ViT-test 1000 classes at 32px" in text
  for photo in ("astronaut", "coffee", "chelsea"):
    assert f"{photo}: top-5" in text
  assert "exported and reloaded" in text
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs)
