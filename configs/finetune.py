"""Fine-tuning a published checkpoint, as in the ViT paper: `finetune.py:<model>,<dataset>`.

  python -m vit_jax.main --config=configs/finetune.py:b16,cifar100 --workdir=DIR \
      --config.pretrained=ViT-B_16.npz

SGD momentum 0.9, batch 512, 500 warm-up steps then cosine decay, gradient-norm clip 1.0,
no weight decay, zero-initialised head. cifar10 / cifar100: 10,000 steps at 384px
(train `train[:98%]`, val `train[98%:]`, test `test`); imagenet2012: 20,000 steps;
oxford_iiit_pet / oxford_flowers102: 500 steps. Any other tfds image-classification dataset
works by name (set --config.num_classes when its tfds metadata is not available).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    '_vit_configs_common', os.path.join(os.path.dirname(__file__), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# dataset -> (num_classes, total_steps, train split, val split, test split)
DATASETS = {
    'cifar10': (10, 10_000, 'train[:98%]', 'train[98%:]', 'test'),
    'cifar100': (100, 10_000, 'train[:98%]', 'train[98%:]', 'test'),
    'imagenet2012': (1000, 20_000, 'train[:99%]', 'train[99%:]', 'validation'),
    'imagenet2012_real': (1000, 20_000, 'train[:99%]', 'train[99%:]', 'validation'),
    'oxford_iiit_pet': (37, 500, 'train[:90%]', 'train[90%:]', 'test'),
    'oxford_flowers102': (102, 500, 'train', 'validation', 'test'),
}


def _tfds_num_classes(name, data_dir=None):
  """num_classes from a prepared tfds dataset's metadata (None if unavailable)."""
  try:
    import tensorflow_datasets as tfds
    info = tfds.builder(name, data_dir=data_dir).info
    return int(info.features['label'].num_classes)
  except Exception:  # not prepared here / not a classification dataset
    return None


def get_config(arg='b16,cifar100'):
  args = common.parse_args(arg, ('model', 'dataset'), {'model': 'b16', 'dataset': 'cifar100'})
  name = args['dataset']
  if name in DATASETS:
    num_classes, steps, train, val, test = DATASETS[name]
  else:
    num_classes, steps, train, val, test = (
        _tfds_num_classes(name) or -1, 10_000, 'train[:98%]', 'train[98%:]', 'test')
  img = 384 if name.startswith('cifar') or name.startswith('imagenet') else 224

  c = common.base()
  c.model_name = common.model_name(args['model'])  # published model name
  c.img_size = img  # fine-tuning resolution; the position embedding is resized to it
  c.head_zero_init = True  # the new head starts at zero
  c.model.dropout_rate = 0.0  # no dropout when fine-tuning
  c.pretrained = None  # path of the published .npz (e.g. gs://vit_models/imagenet21k/ViT-B_16.npz)

  c.dataset = name  # tfds name
  c.train_split = train  # fine-tuning split
  c.val_split = val  # held-out part of train (model selection)
  c.test_split = test  # reported split
  c.num_classes = num_classes  # -1: set --config.num_classes (tfds metadata not found)
  # '{img_size}', '{num_classes}', '{resize}' (= img_size * 448/384) are filled in by train.py.
  c.pp_train = ('decode|resize({resize})|random_crop({img_size})|flip_lr|value_range(-1, 1)|'
                'onehot({num_classes})')  # resize, random crop, flip
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # resize only
  c.shuffle_buffer = 50_000  # examples

  c.total_steps = steps  # published schedule length for this dataset
  c.warmup_steps = 500  # linear warm-up
  c.batch_size = 512  # global batch
  c.eval_batch_size = 512  # global eval batch
  c.log_every = 50  # train metrics
  c.eval_every = 1000 if steps >= 2000 else 100  # val/test accuracy
  c.checkpoint_every = 1000 if steps >= 2000 else 250  # orbax checkpoints

  c.optim.name = 'sgd'  # SGD with momentum
  c.optim.lr = 0.03 if name.startswith('cifar') or name.startswith('imagenet') else 0.01  # from {0.001, 0.003, 0.01, 0.03}
  c.optim.momentum = 0.9  # momentum
  c.optim.schedule = 'cosine'  # cosine decay after warm-up
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 1.0  # global norm clip
  return c
