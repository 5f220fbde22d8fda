"""Fine-tuning a published checkpoint: `finetune.py:<model>,<dataset>[,<crop> or <mode>]`.

  python -m vit_jax.main --config=configs/finetune.py:b16,cifar100 --workdir=DIR \
      --config.pretrained=ViT-B_16.npz
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar100,lora --workdir=DIR \
      --config.pretrained=ViT-B_16.npz     # adapters and the head train, the rest is frozen
  python -m vit_jax.sweep --config=configs/finetune.py:b16,cifar100 --workdir=DIR \
      --set=pretrained=ViT-B_16.npz        # the published lr sweep (LR_SWEEP), then test

`<dataset>` is one of DATASETS or any other dataset string of vit_jax.data (a tfds name,
'imagefolder:ROOT', ...; set --config.num_classes when it cannot be read from tfds
metadata). `<crop>` (or crop=...) picks the train augmentation: 'inception' (default, as
published), 'resize_crop' or 'resmall_crop' (big_vision's alternatives); each is followed
by a flip. `<mode>` (or mode=...) picks what trains (MODES):
  full         every parameter, as published (default)
  head         the classifier head only (a linear probe of the frozen model):
               config.trainable='head/.*'
  layer_decay  every parameter, block i of L at lr * decay ** (L - i), the embeddings at
               lr * decay ** (L + 1) (vit_jax/trainable.py): decay 0.65; 0.75 for the
               LARGE_MODELS; MAE's fine-tuning values for base and large / huge
               (facebookresearch/mae FINETUNE.md; BEiT fine-tunes base with 0.65 too)
  lora         rank-8 adapters (alpha 8) on the attention's query, key and value kernels and
               the head; the rest is frozen (vit_jax/lora.py). The exported model
               (checkpoint.load(workdir), save_npz) has the adapters merged in.
The modes keep the published recipe otherwise, lr included: nothing is published for them
on these checkpoints, so sweep the lr (vit_jax.sweep) for a mode as for full fine-tuning.

Settings and where they come from (ViT = Dosovitskiy et al. 2021, App. B.1.1 and Table 4;
official = google-research/vision_transformer vit_jax/; bv = big_vision configs/transfer.py):
  steps: cifar 10,000, imagenet 20,000,   ViT Table 4; official configs/common.py:86-106;
    pets / flowers 500                    bv :68-77
  warm-up: 500, pets / flowers 100        official configs/common.py:68; bv :68-77 and
                                          official configs/augreg.py:58-59 (500-step runs)
  cosine decay to 0                       ViT Table 4 caption; official configs/common.py:66
  SGD momentum 0.9, batch 512, no weight  ViT App. B.1.1 and Table 4 caption; official
    decay, grad-norm clip 1               configs/common.py:41,48
  resolution 384 (every dataset)          ViT Table 4 caption ("fine-tuning resolution is 384")
  train: Inception crop (5-100% of the    official input_pipeline.py:199-211
    area, aspect 3/4-4/3) to 384 + flip
  eval: resize to 384                     official input_pipeline.py:213
  lr 0.03; B/16 on cifar10 0.01;          official configs/common.py:64, configs/vit.py:35-36;
    pets / flowers 0.01                   bv :172 (its default lr)
  dropout 0.1 for L/16, H/14, R50+B/16,   official configs/models.py:142, :160, :273, :320
    R50+L/32; 0 otherwise
  splits: cifar train[:98%] / val         official configs/common.py:89, :96, :103 (train);
    train[98%:] / test; imagenet          bv :68-77 (val splits); the dev sub-splits are ViT
    train[:99%] / train[99%:] /           App. B.1.1 (10% pets / flowers, 2% cifar, 1%
    validation; pets, flowers             imagenet)
    train[:90%] / train[90%:] / test
  zero-initialised new head               ViT App. B.1.1
  lr sweep: {0.001, 0.003, 0.01, 0.03};   ViT Table 4; selected on the dev split (App. B.1.1)
    imagenet {0.003, 0.01, 0.03, 0.06}
  imagenet: ReaL accuracy on              ViT Tables 5-6 report it; bv :139-143 (its eval)
    imagenet2012_real's validation split
  SGD momentum in bfloat16                official train.py:143 (accumulator_dtype='bfloat16';
                                          configs/common.py:43 declares it); float32 is an
                                          option: --config.optim.mu_dtype=float32 (exact; twice
                                          the state, yet less HBM per chip in the compiled
                                          B/16 step: benchmarks/RESULTS.md)
  the step: clip -> SGD momentum -> lr,   official train.py:138-145 (optax chain) and :37-70
    warm-up from lr 0 (lr * step /        (make_update_fn); utils.py:78-94 (schedule); the
    warmup_steps, steps counted from 0)   same update within float32 rounding
                                          (tests/test_published_step.py)
Deliberate deviations:
  the whole batch in one pass             official configs/common.py:45 accumulates 8
                                          micro-batches "to save on memory"; the mean
                                          gradient is the same up to float32 rounding
                                          (tests/test_train.py; --config.grad_accum_steps=8
                                          accumulates as it does)
  final runs train on the train split     as the official code does; the paper's final runs
    minus the dev split                   train on the entire train split (App. B.1.1):
                                          `vit_jax.sweep --final_train_split=train`
"""
import ml_collections

from configs import common

# dataset -> (num_classes, total_steps, warmup_steps, train split, val split, test split)
DATASETS = {
    'cifar10': (10, 10_000, 500, 'train[:98%]', 'train[98%:]', 'test'),
    'cifar100': (100, 10_000, 500, 'train[:98%]', 'train[98%:]', 'test'),
    'imagenet2012': (1000, 20_000, 500, 'train[:99%]', 'train[99%:]', 'validation'),
    'oxford_iiit_pet': (37, 500, 100, 'train[:90%]', 'train[90%:]', 'test'),
    'oxford_flowers102': (102, 500, 100, 'train[:90%]', 'train[90%:]', 'test'),
}
# Models whose 384 px fine-tuning does not fit a v3-8 core without recomputation.
LARGE_MODELS = ('ViT-L_16', 'ViT-H_14', 'R50+ViT-L_32')
# The published lr grids (ViT Table 4); vit_jax.sweep trains each and keeps the best on val.
LR_SWEEP = (0.001, 0.003, 0.01, 0.03)
LR_SWEEP_IMAGENET = (0.003, 0.01, 0.03, 0.06)
# What trains: config fields each mode sets (the module docstring says why).
MODES = ('full', 'head', 'layer_decay', 'lora')
# Train augmentations before the flip; '{resize}' is img_size * 448 / 384.
CROPS = {
    'inception': 'inception_crop({img_size})',  # published default
    'resize_crop': 'resize({resize})|random_crop({img_size})',
    'resmall_crop': 'resize_small({resize})|random_crop({img_size})',
}


def _tfds_num_classes(name, data_dir=None):
  """num_classes from a prepared tfds dataset's metadata (None if unavailable)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    info = tfds.builder(name, data_dir=data_dir).info
    return int(info.features['label'].num_classes)
  except Exception:  # pylint: disable=broad-except  # not prepared here / not tfds / no 'label'
    return None


def get_config(arg='b16,cifar100'):
  args = common.parse_args(arg, ('model', 'dataset', 'crop_or_mode'),
                           {'model': 'b16', 'dataset': 'cifar100', 'crop': 'inception',
                            'mode': 'full', 'crop_or_mode': None}, keys=('crop', 'mode'))
  third = args['crop_or_mode']
  if third is not None:
    args['mode' if third in MODES else 'crop'] = third
  name, crop, mode = args['dataset'], args['crop'], args['mode']
  if crop not in CROPS:
    raise ValueError(f'Unknown crop {crop!r}; use one of {", ".join(CROPS)} (or a mode: '
                     f'{", ".join(MODES)}).')
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; use one of {", ".join(MODES)}.')
  if name in DATASETS:
    num_classes, steps, warmup, train, val, test = DATASETS[name]
  elif name.startswith('imagefolder:'):  # splits from the folder; classes from the data (-1)
    from vit_jax.data import imagefolder  # pylint: disable=g-import-not-at-top
    num_classes, steps, warmup, (train, val, test) = (
        -1, 10_000, 500, imagefolder.default_splits(name))
  else:  # any other dataset string passes through to vit_jax.data
    num_classes, steps, warmup, train, val, test = (
        _tfds_num_classes(name) or -1, 10_000, 500, 'train[:98%]', 'train[98%:]', 'test')
  model = common.model_name(args['model'])

  c = common.base()
  c.model_name = model  # published model name
  c.img_size = 384  # fine-tuning resolution; the position embedding is resized to it
  c.head_zero_init = True  # the new head starts at zero
  c.model.dropout_rate = common.finetune_dropout(model)  # as published per model
  # L/16 at 384 px, batch 512 on v3-8 needs 15.5 GiB per 16 GiB core without remat (too
  # little headroom) and 10.5 with 'full' (python -m vit_jax.aot; README table); B/16 fits
  # without (14.5 of 16).
  c.model.remat_policy = 'full' if model in LARGE_MODELS else 'none'  # recompute to fit v3-8
  c.pretrained = None  # published .npz (e.g. gs://vit_models/imagenet21k/ViT-B_16.npz) or a workdir

  c.dataset = name  # dataset string of vit_jax.data
  c.train_split = train  # fine-tuning split
  c.val_split = val  # dev split (model and lr selection)
  c.test_split = test  # reported split
  c.num_classes = num_classes  # -1: from the dataset's label feature (vit_jax.data)
  c.pp_train = (f'decode|{CROPS[crop]}|flip_lr|value_range(-1, 1)|'
                'onehot({num_classes})')  # crop (see CROPS), then flip
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # resize only
  c.shuffle_buffer = 50_000  # examples
  c.lr_sweep = LR_SWEEP_IMAGENET if name.startswith('imagenet') else LR_SWEEP  # for vit_jax.sweep
  if name == 'imagenet2012':  # ImageNet ReaL labels (Beyer et al. 2020) as an extra test set
    c.evals.real = common.evaluator(  # ImageNet ReaL: a second evaluation of the same model
        'real', dataset='imagenet2012_real',  # tfds dataset: the validation images, relabelled
        split='validation',  # its only split
        pp=('decode|resize({img_size})|value_range(-1, 1)|'
            'multi_hot({num_classes}, key="real_label")'))  # label sets, scored as ReaL

  c.total_steps = steps  # published schedule length for this dataset
  c.warmup_steps = warmup  # linear warm-up, then cosine decay to 0
  c.optim.warmup_from_zero = True  # as published: the first update has lr 0
  c.batch_size = 512  # global batch
  c.eval_batch_size = 512  # global eval batch
  c.log_every = 50  # train metrics
  c.eval_every = 1000 if steps >= 2000 else 100  # val/test accuracy
  c.checkpoint_every = 1000 if steps >= 2000 else 250  # orbax checkpoints

  c.optim.name = 'sgd'  # SGD with momentum
  c.optim.lr = 0.01 if (name == 'cifar10' and model == 'ViT-B_16') or name.startswith(
      'oxford') else 0.03  # published defaults (see the docstring); LR_SWEEP for the sweep
  c.optim.momentum = 0.9  # momentum
  c.optim.mu_dtype = 'bfloat16'  # momentum dtype, as published ('float32': exact; see the docstring)
  c.optim.schedule = 'cosine'  # cosine decay after warm-up
  c.optim.end_lr_fraction = 0.0  # decays to 0
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 1.0  # global norm clip

  if mode == 'head':
    c.trainable = 'head/.*'  # a linear probe: only the new head trains
  elif mode == 'layer_decay':
    c.optim.layer_decay = 0.75 if model in LARGE_MODELS else 0.65  # MAE's values (docstring)
  elif mode == 'lora':
    c.trainable = 'head/.*'  # the new head trains beside the adapters; the base is frozen
    c.lora.rank = 8  # adapter rank
    c.lora.alpha = 8.0  # scale alpha / rank = 1
    c.lora.targets = 'qkv'  # query, key and value kernels of every block
  return c
