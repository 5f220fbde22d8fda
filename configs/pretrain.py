"""Pre-training as in AugReg ("How to train your ViT?", Steiner et al. 2021).

  python -m vit_jax.main --workdir=DIR \\
    --config=configs/pretrain.py:B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0
  python -m vit_jax.main --workdir=DIR \\
    --config=configs/pretrain.py:b16,imagenet21k,medium1,epochs=30,wd=0.03,do=0.1,sd=0.1

The argument is either a published AugReg checkpoint name (the file names of
gs://vit_models/augreg, listed in google-research/vision_transformer's README)
or `<model>,<dataset>[,<aug>][,epochs=E][,lr=L][,wd=W][,do=D][,sd=S]`:
model 'b16' / 'ViT-B_16' / 'B_16' / 'R50_L_32'...; dataset 'imagenet21k' (i21k),
'imagenet2012' (i1k) or 'jft'; aug one of AUGREG below. Every field of a
published name (model, dataset, epochs, lr, aug, wd, do, sd) is an argument.

Settings and where they come from. paper = arXiv:2106.10270v2 (TMLR); big_vision
is the paper's reproduction code: i21k = configs/vit_i21k.py @0127fb6, i1k =
configs/vit_i1k.py @95ccb15 (its first release; later ones moved i1k to a sigmoid
loss), utils = big_vision/utils.py @95ccb15:
  aug level -> RandAugment (layers, magnitude), mixup alpha: none (0, 0, 0),
    light1 (2, 0, 0), light2 (2, 10, 0.2), medium1 (2, 15, 0.2), medium2
    (2, 15, 0.5), strong1 (2, 20, 0.5), strong2 (2, 20, 0.8)
                                         paper Sec. 3.3; i21k:30-48, i1k:39-57
  RandAugment ops and level mapping      vit_jax/data/randaug.py (its sources)
  mixup: one Beta(alpha, alpha) weight per batch, the larger on the example
    itself                               utils:700-735
  do / sd: 0.0 or 0.1 each, independent of aug      paper Sec. 3.3
  wd: 0.1 or 0.03, decoupled but multiplied by the learning rate, i.e. a
    per-step decay of wd * lr(t) (optim.weight_decay = wd * lr)
                                         paper Sec. 3.3; i21k:110 (wd=1e-4)
  lr 0.001, Adam b1 0.9 b2 0.999, batch 4096, 10k linear warm-up then cosine
    decay, global-norm clip 1.0          paper Sec. 3.4; i21k:79, 105-111
  Adam first moment in bfloat16          i21k:106
  the step: clip -> Adam -> lr -> decoupled weight decay on kernels -> schedule, warm-up
    from lr 0 (step / warmup_steps, steps counted from 0)
                                         big_vision/optax.py:75-149, utils:1102-1141 (@0127fb6);
                                         the same update within float32 rounding
                                         (tests/test_published_step.py)
  epochs: 300 (i1k, i21k) or 30 (i21k)   paper Sec. 3.4; i21k:57
  224 px Inception crop + left-right flip, shuffle buffer 250k
                                         paper Sec. 3.4; i21k:80, 85
  eval: resize_small(256, area) + central 224 crop  i21k:86 (area: big_vision's
                                         resize_small default)
  i21k: 21,843 classes, sigmoid cross-entropy, head bias -10, train
    full[51200:], minival full[25600:51200], test full[:25600]
                                         i21k:58-60, 77, 125-126
  i1k: softmax cross-entropy, train train[:99%], minival train[99%:], test
    validation                           paper Sec. 3.1; i1k:78, 82, 151, 155

Deliberate deviations:
  * Epochs become steps when training starts: total_epochs x the train
    split's size / batch_size, rounded, as big_vision does
    (train.resolve_epochs); a non-zero --config.total_steps takes precedence.
    For i1k that is round(300 x 1,268,355 / 4096) = 92,897 steps.
  * Mixup draws one weight per host batch, not one for the global batch.
  * Published file names with aug 'light0' (a few R26+S/32 files) are refused:
    the paper defines no such level.
  * 'none' / 'light' / 'medium' / 'strong' (no digit) are kept as aliases of
    none / light2 / medium2 / strong2; dropout and stochastic depth no longer
    follow them (give do= / sd=).
  * The model keeps the class-token head of the published AugReg files and no
    pre-logits layer (paper Sec. 3.2); today's big_vision vit_i21k.py trains a
    GAP head instead.
  * The class token has a position-embedding row, as in the published AugReg
    files (big_vision's models/vit.py:341-351 @0127fb6 folds that row into the
    token when it reads them). Today's big_vision adds the position embedding
    before it prepends the token (models/vit.py:219-225), so there the token's
    input moves by the token's own update; here by the token's and its row's,
    which get the same gradient: twice as far per step (2.0x, measured over 5
    Adam steps of ViT-Ti/16 at 32 px; benchmarks/RESULTS.md).
  * Train images are decoded, then cropped (decode|inception_crop): the same
    crop distribution as big_vision's fused decode_jpeg_and_inception_crop,
    which also reads non-JPEG datasets.
  * i1k's extra evaluations (ImageNet-V2, ReaL) are not configured here.
  * 'jft' is not an AugReg dataset: a JFT-like multi-label set trained for a
    fixed 500k steps with linear decay as in the ViT paper.
"""
import os
import re

from ml_collections import config_dict

from configs import common

# AugReg level -> (RandAugment num_layers, magnitude, mixup alpha); paper Sec. 3.3.
AUGREG = {
    'none': (0, 0, 0.0),
    'light1': (2, 0, 0.0),
    'light2': (2, 10, 0.2),
    'medium1': (2, 15, 0.2),
    'medium2': (2, 15, 0.5),
    'strong1': (2, 20, 0.5),
    'strong2': (2, 20, 0.8),
}
AUG_ALIASES = {'light': 'light2', 'medium': 'medium2', 'strong': 'strong2'}

# dataset -> tfds name, classes, sigmoid loss, train / val / test split, default epochs (or steps).
DATASETS = {
    'imagenet21k': dict(tfds='imagenet21k', classes=21_843, sigmoid=True, train='full[51200:]',
                        val='full[25600:51200]', test='full[:25600]', epochs=300),
    'imagenet2012': dict(tfds='imagenet2012', classes=1000, sigmoid=False, train='train[:99%]',
                         val='train[99%:]', test='validation', epochs=300),
    'jft': dict(tfds='jft', classes=18_291, sigmoid=True, train='train', val='validation',
                test=None, steps=500_000),
}
DATASET_ALIASES = {'i21k': 'imagenet21k', 'i21k_30': 'imagenet21k', 'i1k': 'imagenet2012'}

# A published AugReg pre-training checkpoint name.
NAME = re.compile(r'(?P<model>[A-Za-z0-9_]+)-(?P<dataset>i1k|i21k|i21k_30)-(?P<epochs>\d+)ep'
                  r'-lr_(?P<lr>[0-9.e-]+)-aug_(?P<aug>[a-z0-9]+)-wd_(?P<wd>[0-9.e-]+)'
                  r'-do_(?P<do>[0-9.]+)-sd_(?P<sd>[0-9.]+)')
KEYS = ('epochs', 'lr', 'wd', 'do', 'sd')


def model_name(alias: str) -> str:
  """'b16' / 'B_16' / 'R50_L_32' / 'R_Ti_16' / 'ViT-B_16' -> a models.create() name."""
  m = re.fullmatch(r'(?:(R\d*)_)?((?:Ti|S|B|L|H)_\d+)', alias)  # AugReg file-name prefix
  if m:
    return f'{m[1]}+ViT-{m[2]}' if m[1] else f'ViT-{m[2]}'
  return common.model_name(alias)


def parse_name(name: str) -> dict:
  """A published AugReg file name (optionally with .npz) -> the config arguments."""
  base = os.path.basename(name)
  base = base[:-4] if base.endswith('.npz') else base
  if '--' in base:
    raise ValueError(f'{name!r} is a fine-tuned checkpoint; give its pre-training part '
                     f'{base.split("--")[0]!r}.')
  m = NAME.fullmatch(base)
  if not m:
    raise ValueError(f'{name!r} is not an AugReg checkpoint name like '
                     'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.')
  args = m.groupdict()
  args['dataset'] = DATASET_ALIASES[args['dataset']]
  return args


def parse_arg(arg: str | None) -> dict:
  """The config argument -> {model, dataset, aug, epochs, lr, wd, do, sd} (strings or None)."""
  arg = (arg or '').strip()
  if NAME.fullmatch(os.path.basename(arg).removesuffix('.npz').split('--')[0]) or '--' in arg:
    return parse_name(arg)
  args = common.parse_args(arg, ('model', 'dataset', 'aug'),
                           dict(model='b16', dataset='imagenet21k', aug='none'), keys=KEYS,
                           what='pretrain.py')
  args['dataset'] = DATASET_ALIASES.get(args['dataset'], args['dataset'])
  return args


def _number(args, key, default):
  value = args.get(key)
  if value in (None, ''):
    return default
  try:
    return float(value)
  except ValueError:
    raise ValueError(f'pretrain.py argument {key}={value!r} is not a number.') from None


def get_config(arg=None):
  args = parse_arg(arg)
  if args['dataset'] not in DATASETS:
    raise ValueError(f'pretrain dataset {args["dataset"]!r}; valid: {sorted(DATASETS)} '
                     f'(or {sorted(DATASET_ALIASES)}).')
  aug = AUG_ALIASES.get(args['aug'], args['aug'])
  if aug not in AUGREG:
    hint = (' Some published files say aug_light0, which the paper does not define.'
            if aug == 'light0' else '')
    raise ValueError(f'AugReg setting {args["aug"]!r}; valid: {", ".join(AUGREG)}.{hint}')
  ds = DATASETS[args['dataset']]
  ra_layers, ra_magnitude, mixup = AUGREG[aug]
  lr = _number(args, 'lr', 1e-3)
  wd = _number(args, 'wd', 0.1)
  epochs = _number(args, 'epochs', ds.get('epochs'))

  c = common.base()
  c.model_name = model_name(args['model'])  # models.create() name
  c.img_size = 224  # pre-training resolution
  c.head_zero_init = True  # zero head kernel; bias = model.head_bias_init
  c.model.dropout_rate = _number(args, 'do', 0.0)  # AugReg 'do'
  c.model.stochastic_depth = _number(args, 'sd', 0.0)  # AugReg 'sd' (max drop-path rate)
  c.model.head_bias_init = -10.0 if ds['sigmoid'] else 0.0  # -10 keeps early sigmoid losses small
  c.model.dtype = 'bfloat16'  # compute dtype on accelerators
  # Layout from TPU compiles (python -m vit_jax.aot; README "Before you launch on a TPU"):
  # at batch 4096 B/16 needs 1.8 GiB/chip on v5e-256, L/16 10.2 of 32 on v4-64, H/14 23.5 of
  # 95 on v5p-64 with unrolled layers, 2.6 / 14.5 / 31.8 scanned, and H/14 fits v5e-256
  # only unrolled (10.8 vs 16.5 of 16); scanned compiles faster (H/14 on v5p-64: 36 s vs
  # 126 s on a 2-core CPU). No layer is recomputed by default (only the attention
  # probabilities are, and scanned, the MLP activation); when a job does not fit,
  # 'full' remat cuts most (B/16 at 64 per chip: 3.7 -> 1.9 GiB; 'dots' to 3.8).
  c.model.scan = False  # unrolled layers: less HBM than one scanned block
  c.model.remat_policy = 'none'  # 'full' when aot says the job does not fit

  c.dataset = ds['tfds']  # tfds name
  c.train_split = ds['train']  # training split
  c.val_split = ds['val']  # held-out minival (selects the best checkpoint)
  c.test_split = ds['test']  # evaluated at the end and every eval_every
  c.num_classes = ds['classes']  # classes
  c.multi_label = ds['sigmoid']  # sigmoid cross-entropy (i21k, jft) instead of softmax
  label_op = 'multi_hot({num_classes})' if args['dataset'] == 'jft' else 'onehot({num_classes})'
  randaug = f'|randaug({ra_layers}, {ra_magnitude})' if ra_layers else ''
  c.pp_train = ('decode|inception_crop({img_size})|flip_lr' + randaug +
                '|value_range(-1, 1)|' + label_op)  # train ops
  c.pp_eval = ("decode|resize_small(256, method='area')|central_crop({img_size})"
               '|value_range(-1, 1)|' + label_op)  # eval ops
  c.shuffle_buffer = 250_000  # examples
  c.mixup.alpha = mixup  # AugReg mixup strength

  c.batch_size = 4096  # global batch
  c.total_epochs = config_dict.FieldReference(epochs, field_type=float)  # passes over train_split
  c.total_steps = 0 if epochs else ds['steps']  # 0 = total_epochs x train split size / batch_size
  c.warmup_steps = 10_000  # linear warm-up
  c.optim.warmup_from_zero = True  # as published (big_vision): the first update has lr 0
  c.eval_batch_size = 4096  # global eval batch
  c.log_every = 100  # train metrics
  c.eval_every = 10_000  # val accuracy (prec@1 for multi-label)
  c.checkpoint_every = 2_000  # orbax checkpoints (preemption-safe)
  c.keep_best_checkpoints = 0  # only the latest

  c.optim.name = 'adam'  # Adam
  c.optim.lr = lr  # peak learning rate
  c.optim.b1 = 0.9  # first moment decay
  c.optim.b2 = 0.999  # second moment decay
  c.optim.mu_dtype = 'bfloat16'  # first moment in bfloat16 (halves its memory)
  c.optim.schedule = 'linear' if args['dataset'] == 'jft' else 'cosine'  # decay to 0 after warm-up
  c.optim.weight_decay = wd * lr  # decoupled, kernels only: AugReg 'wd' times the peak lr
  c.optim.grad_clip_norm = 1.0  # global norm clip
  c.label_smoothing = 0.0  # none
  c.evals.fewshot = common.fewshot_evaluator(every=10_000, shots=(1, 5, 10, 25))  # probe on pre_logits
  return c
