"""Pre-training as published: `pretrain.py:<model>,<dataset>[,<augreg>]`.

  python -m vit_jax.main --config=configs/pretrain.py:b16,imagenet21k,medium --workdir=DIR

Adam (b1 0.9, b2 0.999; first moment optionally bfloat16), decoupled weight decay on kernels,
lr 1e-3 with 10,000 warm-up steps then linear (or cosine) decay, batch 4096, 224px inception
crop + flip. Datasets: 'imagenet21k' (21,843 classes, softmax) or 'jft' (a JFT-like multi-label
dataset: sigmoid cross-entropy, multi-hot labels, head bias initialised to -10).
AugReg settings (Steiner et al. 2021): none / light / medium / strong = RandAugment and mixup
strength, with dropout and stochastic depth 0.1 whenever augmentation is on.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    '_vit_configs_common', os.path.join(os.path.dirname(__file__), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# dataset -> (tfds name, num_classes, multi_label, total_steps, train, val)
DATASETS = {
    'imagenet21k': ('imagenet21k', 21_843, False, 930_000 // 3, 'full[102400:]', 'full[:102400]'),
    'jft': ('jft', 18_291, True, 500_000, 'train', 'validation'),
}
# AugReg: (randaug num_layers, magnitude or None, mixup alpha, dropout, stochastic depth)
AUGREG = {
    'none': (None, None, 0.0, 0.0, 0.0),
    'light': (2, 10, 0.2, 0.1, 0.1),
    'medium': (2, 15, 0.5, 0.1, 0.1),
    'strong': (2, 20, 0.8, 0.1, 0.1),
}


def get_config(arg='b16,imagenet21k,none'):
  args = common.parse_args(arg, ('model', 'dataset', 'aug'),
                           {'model': 'b16', 'dataset': 'imagenet21k', 'aug': 'none'})
  if args['dataset'] not in DATASETS:
    raise ValueError(f'pretrain dataset {args["dataset"]!r}; valid: {sorted(DATASETS)}')
  if args['aug'] not in AUGREG:
    raise ValueError(f'AugReg setting {args["aug"]!r}; valid: {sorted(AUGREG)}')
  tfds_name, n, multi_label, steps, train, val = DATASETS[args['dataset']]
  ra_layers, ra_mag, mixup, dropout, sd = AUGREG[args['aug']]

  c = common.base()
  c.model_name = common.model_name(args['model'])  # published model name
  c.img_size = 224  # pre-training resolution
  c.head_zero_init = True  # zero head kernel; bias = model.head_bias_init
  c.model.dropout_rate = dropout  # AugReg dropout
  c.model.stochastic_depth = sd  # AugReg stochastic depth
  c.model.head_bias_init = -10.0 if multi_label else 0.0  # -10 keeps early sigmoid losses small
  c.model.dtype = 'bfloat16'  # compute dtype on accelerators
  c.model.scan = True  # one compiled block for all layers
  c.model.remat_policy = 'none'  # 'dots' to trade compute for memory on large models

  c.dataset = tfds_name  # tfds name
  c.train_split = train  # training split
  c.val_split = val  # held-out split (minival)
  c.test_split = None  # none during pre-training
  c.num_classes = n  # classes
  c.multi_label = multi_label  # sigmoid cross-entropy over multi-hot labels
  label_op = 'multi_hot({num_classes})' if multi_label else 'onehot({num_classes})'
  aug = f'|randaug({ra_layers}, {ra_mag})' if ra_layers else ''
  c.pp_train = 'decode|inception_crop({img_size})|flip_lr' + aug + '|value_range(-1, 1)|' + label_op  # train ops
  c.pp_eval = 'decode|resize_small(256)|central_crop({img_size})|value_range(-1, 1)|' + label_op  # eval ops
  c.shuffle_buffer = 250_000  # examples
  c.mixup.alpha = mixup  # AugReg mixup strength

  c.total_steps = steps  # ~90 epochs of ImageNet-21k at batch 4096 / 7 epochs of JFT
  c.warmup_steps = 10_000  # linear warm-up
  c.batch_size = 4096  # global batch
  c.eval_batch_size = 4096  # global eval batch
  c.log_every = 100  # train metrics
  c.eval_every = 10_000  # val accuracy (prec@1 for multi-label)
  c.checkpoint_every = 2_000  # orbax checkpoints (preemption-safe)
  c.keep_best_checkpoints = 0  # only the latest

  c.optim.name = 'adam'  # Adam
  c.optim.lr = 1e-3  # peak learning rate
  c.optim.b1 = 0.9  # first moment decay
  c.optim.b2 = 0.999  # second moment decay
  c.optim.mu_dtype = 'bfloat16'  # first moment in bfloat16 (halves its memory)
  c.optim.schedule = 'linear'  # linear decay to 0 ('cosine' also published)
  c.optim.weight_decay = 1e-4  # decoupled (= the paper's 0.1 x lr 1e-3), kernels only
  c.optim.grad_clip_norm = 1.0  # global norm clip
  c.label_smoothing = 0.0  # none
  c.fewshot.every = 10_000  # few-shot probe on pre_logits
  c.fewshot.shots = (1, 5, 10, 25)  # examples per class
  return c
