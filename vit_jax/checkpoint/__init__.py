"""Checkpoints in and out: published .npz files, timm's and Hugging Face's ViT
weights, and training workdirs.

Published layout: a flat .npz whose '/'-joined keys are the parameter paths of
the original code (`embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`head/kernel` ...; each family's keys are declared beside its model, see
vit_jax.models.families). Other layouts (big_vision's; old vit_jax files;
timm's and Hugging Face's ViT state dicts in .safetensors, torch .bin/.pth or
a model folder with its config.json, local or hf://) are converted on
reading (layouts.py, torch_layouts.py).

    model = checkpoint.load('ViT-B_16.npz')   # architecture read from the file
    model = checkpoint.load('ViT-B_16.npz', 'ViT-B_16', num_classes=10, img_size=384)
    model = checkpoint.load('deit_small.safetensors')    # a timm state dict
    model = checkpoint.load('hf://google/vit-base-patch16-224')  # a transformers ViT
    checkpoint.save_npz(model, 'finetuned.npz')
    checkpoint.save_safetensors(model, 'model.safetensors')       # timm's layout
    model = checkpoint.load('workdirs/run')    # a training run's latest checkpoint
    summary = checkpoint.load_params_into(model, 'ViT-B_16.npz')   # a built model
    checkpoint.check_fits('ViT-B_16.npz', abstract_model)   # the same, on shapes only

A training run's own checkpoints (orbax, with optimizer state) are written by
vit_jax.train_state; `load(workdir)` restores the trained model from them.
"""

from vit_jax.checkpoint.files import is_workdir, read_npz
from vit_jax.checkpoint.loader import (LoadSummary, check_fits, load, load_params_into,
                                       read_architecture, save_npz, to_published)
from vit_jax.checkpoint.params import (CheckpointMismatchError, UnsupportedCheckpointError,
                                       resize_posemb)
from vit_jax.checkpoint.state_dicts import is_model_dir, is_state_dict_file
from vit_jax.checkpoint.timm_files import save_safetensors, timm_model_args

__all__ = ["CheckpointMismatchError", "LoadSummary", "UnsupportedCheckpointError",
           "check_fits", "is_model_dir", "is_state_dict_file", "is_workdir", "load",
           "load_params_into", "read_architecture", "read_npz", "resize_posemb",
           "save_npz", "save_safetensors", "timm_model_args", "to_published"]
