"""Fields shared by every run config; each config file starts from `base()`.

Durations are in steps. `None` fields mean "not used" / "model default".
Config files import it as `from configs import common`; `configs.load(spec)` reads a config.
"""
import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, data order, augmentation and dropout

  # ---- Model -------------------------------------------------------------
  c.model_name = 'ViT-B_16'  # a models.create() name; models.names() lists them
  c.model = ml_collections.ConfigDict()  # models.create() overrides (None = model default)
  c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'
  c.model.dropout_rate = config_dict.placeholder(float)  # dropout in MLP blocks
  c.model.attention_dropout_rate = config_dict.placeholder(float)  # dropout on attention weights
  c.model.stochastic_depth = config_dict.placeholder(float)  # drop-path rate (max over layers)
  c.model.scan = config_dict.placeholder(bool)  # stack layers with nnx.scan (faster compile)
  c.model.remat_policy = config_dict.placeholder(str)  # 'none' | 'full' | 'dots' | ...
  c.img_size = 224  # input resolution the model is built for (posemb is resized to it)
  c.head_zero_init = True  # zero the classifier head (kernel and bias) before training
  c.pretrained = config_dict.placeholder(str)  # published .npz or a training workdir; None = from scratch

  # ---- Data (read by vit_jax.data) ----------------------------------------
  c.dataset = 'cifar100'  # tfds name, 'digits' or 'vtab:<task>'
  c.data_dir = config_dict.placeholder(str)  # tfds data_dir (None = tfds default, ~/tensorflow_datasets)
  c.train_split = 'train'  # tfds split to train on
  c.val_split = config_dict.placeholder(str)  # held-out split of evals.val (selects the best checkpoint)
  c.test_split = config_dict.placeholder(str)  # reported split of evals.test
  c.num_classes = 100  # classifier outputs
  c.multi_label = False  # sigmoid cross-entropy over multi-hot labels instead of softmax
  # pp specs may use '{img_size}', '{num_classes}' and '{resize}' (img_size*448/384), filled by train.py.
  c.pp_train = 'decode|inception_crop({img_size})|flip_lr|value_range(-1, 1)|onehot({num_classes})'  # train ops
  c.pp_eval = 'decode|resize({img_size})|value_range(-1, 1)|onehot({num_classes})'  # eval preprocessing ops
  c.shuffle_buffer = 50_000  # examples in the train shuffle buffer
  c.prefetch = 2  # batches prefetched by tf.data
  c.mixup = ml_collections.ConfigDict()
  c.mixup.alpha = 0.0  # mixup Beta(alpha, alpha) strength; 0 = off

  # ---- Durations and batch ------------------------------------------------
  c.total_steps = 10_000  # optimizer steps
  c.warmup_steps = 500  # linear warm-up steps (see optim.warmup_from_zero)
  c.batch_size = 512  # global batch (all processes and devices together)
  c.eval_batch_size = 512  # global eval batch (the last batch is padded and masked)
  c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.log_every = 50  # steps between train metrics (metrics.jsonl, TensorBoard, progress bar)
  c.eval_every = 1000  # steps between evaluations of config.evals (0 = only at the end)
  c.checkpoint_every = 1000  # steps between checkpoints (0 = only at the end / on SIGTERM)
  c.keep_checkpoints = 2  # keep the last N checkpoints
  c.keep_best_checkpoints = 1  # also keep the best N by val accuracy of checkpoints saved at eval steps (0 = none)

  # ---- Optimizer -----------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # 'sgd' (momentum) or 'adam'
  c.optim.lr = 0.03  # base (peak) learning rate
  c.optim.schedule = 'cosine'  # decay after warm-up: 'cosine' | 'linear' | 'constant'
  c.optim.end_lr_fraction = 0.0  # final lr as a fraction of the peak
  c.optim.warmup_from_zero = False  # True: the first update has lr 0 (as published); False: lr/warmup_steps
  c.optim.momentum = 0.9  # SGD momentum (0 = plain SGD)
  c.optim.nesterov = False  # Nesterov momentum for SGD
  c.optim.b1 = 0.9  # Adam first-moment decay
  c.optim.b2 = 0.999  # Adam second-moment decay
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.mu_dtype = 'float32'  # dtype of the first moment / momentum ('bfloat16' halves its memory)
  c.optim.weight_decay = 0.0  # decoupled weight decay on kernels only (scaled by lr(t)/lr)
  c.optim.grad_clip_norm = 1.0  # clip the global gradient norm (0 = off)
  c.label_smoothing = 0.0  # softmax label smoothing
  c.ema_decay = 0.0  # EMA of parameters, evaluated instead of the raw ones when > 0
  c.divergence = ml_collections.ConfigDict()  # stop a diverging run (NaN/Inf always stops it)
  c.divergence.factor = 10.0  # the loss diverges above max(factor x its best, its first) (0 = off)
  c.divergence.patience = 2  # ... for this many log intervals in a row

  # ---- Sharding ------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
  c.mesh.fsdp = 1  # fully-sharded data-parallel axis size (shards params over 'embed')
  c.mesh.model = 1  # tensor-parallel axis size (shards 'mlp' / 'heads')
  c.sharding_rules = (  # (logical axis, mesh axis or None); names without a rule are replicated
      ('embed', 'fsdp'), ('channels', 'fsdp'), ('mlp', 'model'), ('heads', 'model'),
      ('conv_out', 'model'), ('kv', None), ('classes', None), ('layers', None))

  # ---- Evaluations (vit_jax/evaluators): name -> evaluator(type, ...) -------
  c.evals = ml_collections.ConfigDict()
  c.evals.val = evaluator('classification', split='{val_split}')  # val/*: selects the best checkpoint
  c.evals.test = evaluator('classification', split='{test_split}')  # test/*: the reported split

  # ---- Reporting -----------------------------------------------------------
  c.peak_flops = config_dict.placeholder(float)  # device peak FLOP/s for MFU (None = look up device kind)
  c.wandb = ml_collections.ConfigDict()  # Weights & Biases (pip install -e '.[wandb]'); off without a project
  c.wandb.project = config_dict.placeholder(str)  # W&B project: mirrors metrics.jsonl to it (process 0)
  c.wandb.entity = config_dict.placeholder(str)  # W&B team or user (None = the default)
  c.wandb.name = config_dict.placeholder(str)  # run name (None = the workdir's name)
  c.progress_bar = True  # a progress line per log step on stderr (step, loss, images/s, input wait, ETA)
  return c


def evaluator(type, every=None, **fields):  # pylint: disable=redefined-builtin
  """One entry of config.evals: an evaluator of vit_jax/evaluators and its fields.

  every: steps between runs (None = config.eval_every, 0 = only at the end).
  """
  return ml_collections.ConfigDict(dict(
      type=type, every=config_dict.placeholder(int) if every is None else every, **fields))


def fewshot_evaluator(every, shots=(1, 5, 10)):
  """The few-shot linear probe on pre_logits (vit_jax/evaluators/fewshot.py)."""
  return evaluator(
      'fewshot', every=every,
      shots=shots,  # examples per class in the probe's train set
      l2_reg=2.0 ** 10,  # ridge regularisation of the closed-form probe
      train_split=config_dict.placeholder(str),  # probe train split (None = train_split)
      test_split=config_dict.placeholder(str),  # probe test split (None = test_split or val_split)
      max_examples=2000)  # at most this many examples per split are embedded


def parse_args(arg, names, defaults, keys=(), what='config'):
  """'a,b,k=v' -> dict: positional values for `names` in order, then key=value items for
  `names` or `keys`; defaults fill what is missing. ValueError names what is wrong."""
  out = dict(defaults)
  positional = []
  for item in filter(None, (v.strip() for v in (arg or '').split(','))):
    key, eq, value = item.partition('=')
    if not eq:
      positional.append(item)
    elif key in names or key in keys:
      out[key] = value
    else:
      raise ValueError(f'Unknown {what} argument {key!r}; valid: {", ".join((*names, *keys))}.')
  if len(positional) > len(names):
    raise ValueError(f'Too many config args {arg!r}; expected {",".join(names)}'
                     + (f'[,key=value] with keys {", ".join(keys)}.' if keys else '.'))
  out.update({n: v for n, v in zip(names, positional) if v})
  return out


# Short model aliases accepted in config args ('b16' == 'ViT-B_16').
MODEL_ALIASES = {
    'ti16': 'ViT-Ti_16', 's16': 'ViT-S_16', 's32': 'ViT-S_32', 'b8': 'ViT-B_8', 'b16': 'ViT-B_16',
    'b32': 'ViT-B_32', 'l16': 'ViT-L_16', 'l32': 'ViT-L_32', 'h14': 'ViT-H_14',
    'r26s32': 'R26+ViT-S_32', 'r50b16': 'R50+ViT-B_16', 'r50l32': 'R50+ViT-L_32',
    'mixer_b16': 'Mixer-B_16', 'mixer_b32': 'Mixer-B_32', 'mixer_l16': 'Mixer-L_16',
    'test': 'ViT-test',
}


def model_name(alias):
  return MODEL_ALIASES.get(alias.lower(), alias)


# Dropout of the published fine-tuning runs: the official model configs
# (google-research/vision_transformer vit_jax/configs/models.py) set 0.1 for L/16 (:142),
# H/14 (:160), R50+B/16 (:273) and R50+L/32 (built from L/16, :320); every other model 0.
FINETUNE_DROPOUT = {'ViT-L_16': 0.1, 'ViT-H_14': 0.1, 'R50+ViT-B_16': 0.1, 'R50+ViT-L_32': 0.1}


def finetune_dropout(name):
  """Dropout rate of model `name` when fine-tuning, as published."""
  return FINETUNE_DROPOUT.get(name, 0.0)
