"""The default small run: a small ViT on scikit-learn's 8x8 handwritten digits.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits

1,797 digits (about 1,500 train / 300 test), upsampled to 32x32 RGB. With 16x16 patches each
token covers 4x4 original pixels: 4 tokens + class token. Small patches (4x4 = one original
pixel per token) overfit this tiny training set; a few large patches generalize.
Measured on 2 shared CPU cores: about 1 minute end to end (dataset build included), 98.6%
test accuracy (292 of 296); 8x8 patches (16 tokens) reach the same accuracy about twice as slowly.

The models the analyses study (experiments/, vit_jax.analysis.digits_models) are one per
family, each with a 4x4 grid of patch tokens or feature-map positions, so that attention
distances, Fourier spectra and inversions have a spatial grid to work on:

  configs/digits.py:vit_patch8    ViT, 8x8 patches, 4 blocks
  configs/digits.py:mixer_patch8  MLP-Mixer, 8x8 patches, 4 blocks
  configs/digits.py:resnet        BiT ResNet, stem and 2 residual units (8x8 then 4x4 maps)
"""
from configs import common

ARGS = ('vit_patch8', 'mixer_patch8', 'resnet')


def get_config(arg=None):
  if arg not in (None, '', *ARGS):
    raise ValueError(f'configs/digits.py takes no argument or one of {", ".join(ARGS)}; got {arg!r}.')
  c = common.base()
  c.model_name = 'ViT-test'  # small test ViT, resized by the overrides below
  c.model.patch_size = 16  # pixels per patch side at 32x32: 4 tokens of 4x4 digit pixels
  c.model.hidden_size = 64  # token width
  c.model.num_layers = 2  # encoder blocks
  c.model.num_heads = 4  # attention heads
  c.model.mlp_dim = 128  # MLP hidden width
  c.model.dropout_rate = 0.1  # regularises the 1,500-image training set
  c.img_size = 32  # digits are upsampled from 8x8 to 32x32
  c.head_zero_init = True  # zero head: the first loss is exactly log(10)

  c.dataset = 'digits'  # built offline from scikit-learn on first use
  c.train_split = 'train'  # ~1,500 images
  c.val_split = None  # no separate validation split (the test split is reported)
  c.test_split = 'test'  # ~300 images
  c.num_classes = 10  # digits 0-9
  c.pp_train = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # no augmentation
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # same, no randomness
  c.shuffle_buffer = 2_000  # the whole training set

  c.total_steps = 800  # ~70 epochs at batch 128
  c.warmup_steps = 100  # linear warm-up
  c.batch_size = 128  # global batch
  c.eval_batch_size = 256  # global eval batch
  c.log_every = 50  # train metrics
  c.eval_every = 400  # test accuracy during training
  c.checkpoint_every = 400  # orbax checkpoints

  c.optim.name = 'adam'  # Adam converges fastest on this small problem
  c.optim.lr = 1e-3  # peak learning rate
  c.optim.weight_decay = 1e-4  # decoupled, kernels only
  c.optim.grad_clip_norm = 1.0  # global norm clip
  c.label_smoothing = 0.0  # none
  c.mesh.data = -1  # all devices data-parallel
  if arg == 'vit_patch8':
    _vit_patch8(c)
  elif arg == 'mixer_patch8':
    _mixer_patch8(c)
  elif arg == 'resnet':
    _resnet(c)
  return c


def _vit_patch8(c):
  c.model.patch_size = 8  # 4x4 grid of 8x8-pixel patches (2x2 digit pixels each) + class token
  c.model.num_layers = 4  # encoder blocks: depth for the by-layer analyses
  c.total_steps = 500  # ~40 epochs; more steps do not raise the test accuracy
  c.eval_every = 0  # test accuracy once, at the end
  c.checkpoint_every = 0  # one checkpoint, at the end


def _mixer_patch8(c):
  c.model_name = 'Mixer-test'  # small test Mixer, resized by the overrides below
  del c.model.num_heads, c.model.mlp_dim  # ViT fields
  del c.model.dropout_rate, c.model.attention_dropout_rate  # the Mixer has no dropout
  c.model.patch_size = 8  # 4x4 grid of 8x8-pixel patches, as the ViT's
  c.model.hidden_size = 64  # channels per token, as the ViT's width
  c.model.num_layers = 4  # mixer blocks, as the ViT's depth
  c.model.tokens_mlp_dim = 32  # token-mixing MLP width (16 tokens)
  c.model.channels_mlp_dim = 128  # channel-mixing MLP width, as the ViT's MLP
  c.total_steps = 500  # ~40 epochs
  c.eval_every = 0  # test accuracy once, at the end
  c.checkpoint_every = 0  # one checkpoint, at the end


def _resnet(c):
  c.model_name = 'BiT-test'  # BiT ResNet (weight-standardised convs, group norm)
  for k in ('num_heads', 'mlp_dim', 'patch_size', 'hidden_size', 'num_layers',
            'dropout_rate', 'attention_dropout_rate', 'stochastic_depth', 'scan'):
    del c.model[k]  # ViT fields
  c.model.layers = (1, 1)  # one bottleneck unit per stage: 8x8 (256 ch) then 4x4 (512 ch) maps
  c.model.width = 1  # 64 stem channels
  c.total_steps = 150  # ~13 epochs: convolutions learn digits in few steps
  c.warmup_steps = 30  # linear warm-up
  c.eval_every = 0  # test accuracy once, at the end
  c.checkpoint_every = 0  # one checkpoint, at the end
