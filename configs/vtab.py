"""VTAB-1k transfer: `vtab.py:<model>,<task>[,<protocol>]` (e.g. `vtab.py:b16,clevr/count_all`).

  python -m vit_jax.main --config=configs/vtab.py:b16,dtd --workdir=DIR \
      --config.pretrained=ViT-B_16.npz
  python -m vit_jax.vtab --model=b16 --pretrained=ViT-B_16.npz --workdir=DIR --runs=3

The 19 tasks of VTAB-1k (vit_jax.data.vtab lists their tfds names, versions and splits):
train on the 1,000 examples of `train800val200`, report `test`. Two protocols (`c.protocol`,
named in every run's config.json and in the driver's table):

- 'vit' (default): the ViT paper's, one setting for every task.
- 'sweep': per task, each lr of LR_SWEEP is trained on `train800` and scored on `val200`;
  the best is retrained on `train800val200` (run by `python -m vit_jax.vtab --protocol=sweep`;
  a single config of this protocol is one lr of the sweep, --config.optim.lr picks it).

Settings and where they come from (ViT = Dosovitskiy et al. 2021, App. B.1.1 and Table 4;
BiT = Kolesnikov et al. 2020, Sec. 3.3, whose rule the big_transfer repository's TF2 colab
also states; official = google-research/vision_transformer):
  steps 2,500, lr 0.01 ('vit')          ViT Table 4 ("VTAB (19 tasks) | 2 500 | 0.01")
  SGD momentum 0.9, batch 512, cosine,  ViT App. B.1.1 and Table 4 caption
    no weight decay, grad-norm clip 1
  the step of the official fine-tuning: official train.py:138-145 (clip, then optax.sgd with
    momentum in bfloat16), utils.py:78-94 (warm-up from lr 0: lr * step / warmup_steps);
    --config.optim.mu_dtype=float32 keeps an exact momentum (configs/finetune.py)
  resolution 384 on every task          ViT App. B.1.1 ("we do not use task-specific input
                                        resolutions ... high resolution (384 x 384)")
  train: resize + random crop + left-   BiT pre-processing, which ViT follows (App. B.1.1):
    right flip; eval: resize to 384     random crops and flips on every task except where they
                                        change the label: no crop on NO_CROP, no flip on NO_FLIP
  zero-initialised new head             ViT App. B.1.1
  dropout 0.1 for L/16, H/14, R50+B/16,  official model configs (configs/models.py:142, :160,
    R50+L/32; 0 otherwise                 :273, :320), as in configs/finetune.py
Deliberate choices where nothing is published for ViT on VTAB:
  warm-up 500 steps                     the official fine-tuning default (configs/common.py:68)
  crop: resize to 448, random 384       BiT resizes 512 -> crops 480; at ViT's 384 we keep the
                                        448 -> 384 of the official 384 px fine-tuning configs
                                        (configs/augreg.py:63-64, big_vision transfer.py h_res)
  'sweep' protocol (an option)          ViT Table 4's small-dataset grid {0.001, 0.003, 0.01,
                                        0.03}, chosen per task on val200 as task_adaptation's
                                        train800 / val200 / train800val200 splits allow
"""
from configs import common

LR_SWEEP = (0.001, 0.003, 0.01, 0.03)  # lr grid of the 'sweep' protocol (ViT Table 4)
PROTOCOLS = ('vit', 'sweep')  # see the module docstring
# BiT: no random crop where it can remove what the label counts or measures (objects,
# distances, positions); no left-right flip where it changes the label (x position,
# orientation and azimuth are mirrored by a flip).
NO_CROP = frozenset({'clevr/count_all', 'clevr/closest_object_distance', 'dmlab',
                     'kitti/closest_vehicle_distance', 'dsprites/label_x_position'})
NO_FLIP = frozenset({'dsprites/label_x_position', 'dsprites/label_orientation',
                     'smallnorb/label_azimuth'})


def train_pp(task: str) -> str:
  """The train preprocessing of `task` (BiT's crop / flip rule; sizes filled in by train.py)."""
  pp = 'decode|resize({resize})|random_crop({img_size})' if task not in NO_CROP else (
      'decode|resize({img_size})')
  if task not in NO_FLIP:
    pp += '|flip_lr'
  return pp + '|value_range(-1, 1)|onehot({num_classes})'


def get_config(arg='b16,cifar100'):
  args = common.parse_args(arg, ('model', 'task', 'protocol'),
                           {'model': 'b16', 'task': 'cifar100', 'protocol': 'vit'})
  if args['protocol'] not in PROTOCOLS:
    raise ValueError(f'Unknown VTAB protocol {args["protocol"]!r}; use one of {", ".join(PROTOCOLS)}.')
  from vit_jax.data import vtab as vtab_tasks  # the task table (tfds names, splits, classes)
  task = vtab_tasks.get_task('vtab:' + args['task'])

  c = common.base()
  c.protocol = args['protocol']  # 'vit' (lr 0.01 on every task) or 'sweep' (lr chosen on val200)
  c.model_name = common.model_name(args['model'])  # published model name
  c.img_size = 384  # every task at 384 px (ViT App. B.1.1)
  c.head_zero_init = True  # new zero head
  c.model.dropout_rate = common.finetune_dropout(c.model_name)  # as published per model
  c.pretrained = None  # published .npz to transfer from

  c.dataset = 'vtab:' + task.name  # resolved by vit_jax.data (tfds name and version, label function)
  c.train_split = 'train800val200'  # the 1,000 VTAB-1k training examples ('train800' in the sweep)
  c.val_split = None  # 'val200' while sweeping; the final run has no held-out split
  c.test_split = 'test'  # reported split
  c.num_classes = task.num_classes  # classes of this task
  c.pp_train = train_pp(task.name)  # BiT crop / flip rule for this task
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # resize
  c.shuffle_buffer = 1_000  # the whole training set
  c.lr_sweep = LR_SWEEP  # lr grid of the 'sweep' protocol (read by vit_jax.vtab)

  c.total_steps = 2_500  # ViT Table 4
  c.warmup_steps = 500  # official fine-tuning default (none published for VTAB)
  c.optim.warmup_from_zero = True  # as the official fine-tuning: the first update has lr 0
  c.batch_size = 512  # global batch
  c.eval_batch_size = 512  # global eval batch
  c.log_every = 50  # train metrics
  c.eval_every = 500  # test (and val200) accuracy
  c.checkpoint_every = 500  # orbax checkpoints
  c.keep_best_checkpoints = 0  # the last step is the reported one

  c.optim.name = 'sgd'  # SGD with momentum
  c.optim.lr = 0.01  # ViT Table 4 ('sweep': one of LR_SWEEP)
  c.optim.momentum = 0.9  # momentum
  c.optim.mu_dtype = 'bfloat16'  # momentum dtype of the official fine-tuning ('float32': exact)
  c.optim.schedule = 'cosine'  # cosine decay
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 1.0  # global norm clip
  return c
