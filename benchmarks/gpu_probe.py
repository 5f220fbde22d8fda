"""GPU probes behind benchmarks/RESULTS.md section 7 (run on an NVIDIA GPU).

    python benchmarks/gpu_probe.py attention      # XLA vs cuDNN attention
    python benchmarks/gpu_probe.py trace DIR default|xla|cudnn

`attention` prints the installed jax's cuDNN flash-attention conditions, then
times one ViT-B/16 attention layer (256 x 197 tokens, 12 heads of 64, bf16)
forward and forward+backward through XLA and through cuDNN with the tokens
padded to 198 / 208 / 256 and masked, and checks them against XLA.
`trace` writes a jax.profiler (perfetto) trace of three ViT-B/16 bf16 train
steps at batch 256 to DIR; per-kernel times come from its .trace.json.gz.
"""
import inspect
import sys
import time

import jax
import jax.numpy as jnp


def attention_probe():
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    src = inspect.getsource(fa.check_is_flash_attention)
    print(src[src.find("# bf16/fp16"):][:1500])
  except Exception as e:  # pylint: disable=broad-except
    print("no source", e)
  b, n, h, d = 256, 197, 12, 64
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk in ks)

  def make(impl, pad):
    def f(q, k, v):
      if pad:
        w = ((0, 0), (0, pad), (0, 0), (0, 0))
        qp, kp, vp = (jnp.pad(t, w) for t in (q, k, v))
        lens = jnp.full((b,), n, jnp.int32)
        o = jax.nn.dot_product_attention(
            qp, kp, vp, query_seq_lengths=lens, key_value_seq_lengths=lens,
            implementation=impl)
        return o[:, :n]
      return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    fwd = jax.jit(f)
    train = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](g))
    return fwd, train

  ref_fwd, ref_train = make("xla", 0)
  ref_o = ref_fwd(q, k, v).astype(jnp.float32)
  ref_g = [x.astype(jnp.float32) for x in ref_train(q, k, v)]
  for impl, pad in (("xla", 0), ("cudnn", 0), ("cudnn", 1), ("cudnn", 11),
                    ("cudnn", 59)):
    try:
      fwd, train = make(impl, pad)
      o = fwd(q, k, v).astype(jnp.float32)
      gr = train(q, k, v)
      err = float(jnp.abs(o - ref_o).max())
      gerr = max(float(jnp.abs(a.astype(jnp.float32) - r).max())
                 for a, r in zip(gr, ref_g))
      ts = {}
      for name, fn in (("fwd", fwd), ("fwd+bwd", train)):
        jax.block_until_ready(fn(q, k, v))
        t = time.perf_counter()
        for _ in range(20):
          out = fn(q, k, v)
        jax.block_until_ready(out)
        ts[name] = time.perf_counter() - t
      print(f"{impl:5s} pad {pad:2d} (N={n + pad}): fwd {ts['fwd'] / 20 * 1e3:.2f} ms"
            f"  fwd+bwd {ts['fwd+bwd'] / 20 * 1e3:.2f} ms per layer; "
            f"max|dout| {err:.3g} max|dgrad| {gerr:.3g}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{impl} pad {pad}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def trace_train_step(out_dir, attention=None, batch=256):
  from benchmarks import common
  s = common.Setup("ViT-B_16", batch=batch, img_size=224, num_classes=1000,
                   dtype="bfloat16", attention=attention)
  model = common.make_model(s)
  train_step, _, state, _ = common.make_fns(model, s)
  images, labels, key = common.batch_arrays(s)
  for _ in range(3):
    state, loss = train_step(state, images, labels, key)
  loss.block_until_ready()
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    for _ in range(3):
      state, loss = train_step(state, images, labels, key)
    loss.block_until_ready()


if __name__ == "__main__":
  what = sys.argv[1]
  if what == "attention":
    attention_probe()
  elif what == "trace":
    trace_train_step(sys.argv[2], None if sys.argv[3] == "default" else sys.argv[3])
