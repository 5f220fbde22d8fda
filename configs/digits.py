"""The default small run: a small ViT on scikit-learn's 8x8 handwritten digits.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits

1,797 digits (about 1,500 train / 300 test), upsampled to 32x32 RGB. With 16x16 patches each
token covers 4x4 original pixels: 4 tokens + class token. Small patches (4x4 = one original
pixel per token) overfit this tiny training set; a few large patches generalize.
Measured on 2 shared CPU cores: about 1 minute end to end (dataset build included), 98.6%
test accuracy (292 of 296); 8x8 patches (16 tokens) reach the same accuracy about twice as slowly.
"""
from configs import common


def get_config(arg=None):
  del arg
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
  return c

