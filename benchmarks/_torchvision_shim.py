"""Lets timm import where torchvision cannot be installed.

timm imports a few torchvision names at import time (FrozenBatchNorm2d, the
transforms used by its data package). PyPI's torchvision wheels are built
against CUDA torch and fail to load with the CPU-only torch used here, and
ViT-B/16's forward/backward never touches torchvision. If the real package
imports, it is used; otherwise minimal placeholder modules are registered.
"""

import sys
import types


def ensure_importable():
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return "torchvision"
  except Exception:  # pylint: disable=broad-except
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
  import torch  # pylint: disable=g-import-not-at-top

  class FrozenBatchNorm2d(torch.nn.Module):
    """Placeholder (only used by timm for isinstance checks on CNNs)."""

  class _Anything(types.ModuleType):
    """A module whose every missing attribute is a placeholder class."""

    def __getattr__(self, attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      value = type(attr, (), {})
      setattr(self, attr, value)
      return value

  names = ["torchvision", "torchvision.ops", "torchvision.ops.misc",
           "torchvision.transforms", "torchvision.transforms.functional",
           "torchvision.datasets", "torchvision.utils", "torchvision.models",
           "torchvision.models.feature_extraction"]
  for name in names:
    mod = _Anything(name)
    mod.__path__ = []
    sys.modules[name] = mod
  sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
  sys.modules["torchvision.transforms.functional"].InterpolationMode = (
      type("InterpolationMode", (), {n: n.lower() for n in (
          "NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")}))
  for parent, child in [(n.rsplit(".", 1)) for n in names if "." in n]:
    setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])
  return "shim"
