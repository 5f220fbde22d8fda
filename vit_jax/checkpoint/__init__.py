"""Checkpoints in and out: published .npz files and training workdirs.

Published layout: a flat .npz whose '/'-joined keys are the parameter paths of
the original code (`embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`head/kernel` ...; each family's keys are declared beside its model, see
vit_jax.models.families). Other layouts (big_vision's; old vit_jax files)
are converted on reading (layouts.py).

    model = checkpoint.load('ViT-B_16.npz')   # architecture read from the file
    model = checkpoint.load('ViT-B_16.npz', 'ViT-B_16', num_classes=10, img_size=384)
    checkpoint.save_npz(model, 'finetuned.npz')
    model = checkpoint.load('workdirs/run')    # a training run's latest checkpoint
    summary = checkpoint.load_params_into(model, 'ViT-B_16.npz')   # a built model
    checkpoint.check_fits('ViT-B_16.npz', abstract_model)   # the same, on shapes only

A training run's own checkpoints (orbax, with optimizer state) are written by
vit_jax.train_state; `load(workdir)` restores the trained model from them.
"""

from vit_jax.checkpoint.files import is_workdir, read_npz
from vit_jax.checkpoint.loader import (LoadSummary, check_fits, load, load_params_into,
                                       save_npz, to_published)
from vit_jax.checkpoint.params import CheckpointMismatchError, resize_posemb

__all__ = ["CheckpointMismatchError", "LoadSummary", "check_fits", "is_workdir", "load",
           "load_params_into", "read_npz", "resize_posemb", "save_npz", "to_published"]
