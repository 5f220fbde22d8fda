"""VTAB-1k transfer: `vtab.py:<model>,<task>` (e.g. `vtab.py:b16,clevr/count_all`).

The 19 tasks of VTAB-1k (vit_jax.data.vtab lists them with their tfds names and splits):
train on the 1,000 examples of `train800val200`, select hyper-parameters on `val200`
(training on `train800`), report `test`. 2,500 steps, batch 512, SGD momentum, lr from
{0.001, 0.003, 0.01, 0.03}, 224px. `python -m vit_jax.vtab` runs every task and writes
one table.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    '_vit_configs_common', os.path.join(os.path.dirname(__file__), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

LR_SWEEP = (0.001, 0.003, 0.01, 0.03)  # the VTAB-1k learning-rate grid


def get_config(arg='b16,cifar100'):
  args = common.parse_args(arg, ('model', 'task'), {'model': 'b16', 'task': 'cifar100'})
  from vit_jax.data import vtab as vtab_tasks  # the task table (tfds names, splits, classes)
  task = vtab_tasks.get_task('vtab:' + args['task'])
  n = task.num_classes

  c = common.base()
  c.model_name = common.model_name(args['model'])  # published model name
  c.img_size = 224  # VTAB resolution
  c.head_zero_init = True  # new zero head
  c.model.dropout_rate = 0.0  # none
  c.pretrained = None  # published .npz to transfer from

  c.dataset = 'vtab:' + task.name  # resolved by vit_jax.data (tfds name, label function)
  c.train_split = 'train800val200'  # the 1,000 VTAB-1k training examples ('train800' for the sweep)
  c.val_split = 'val200'  # hyper-parameter selection split
  c.test_split = 'test'  # reported split
  c.num_classes = n  # classes of this task
  c.pp_train = 'decode|resize({img_size})|flip_lr|value_range(-1, 1)|onehot({num_classes})'  # resize + flip
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # resize
  c.shuffle_buffer = 1_000  # the whole training set

  c.total_steps = 2_500  # VTAB-1k schedule
  c.warmup_steps = 200  # linear warm-up
  c.batch_size = 512  # global batch
  c.eval_batch_size = 512  # global eval batch
  c.log_every = 50  # train metrics
  c.eval_every = 500  # val/test accuracy
  c.checkpoint_every = 500  # orbax checkpoints
  c.keep_best_checkpoints = 1  # best by val200 accuracy

  c.optim.name = 'sgd'  # SGD with momentum
  c.optim.lr = 0.01  # one of LR_SWEEP (the driver sweeps them all)
  c.optim.momentum = 0.9  # momentum
  c.optim.schedule = 'cosine'  # cosine decay
  c.optim.weight_decay = 0.0  # none
  c.optim.grad_clip_norm = 1.0  # global norm clip
  return c
