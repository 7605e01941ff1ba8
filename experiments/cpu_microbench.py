"""Micro-benchmarks behind the XLA:CPU findings in experiments/PERFORMANCE.md.

  python experiments/cpu_microbench.py [--benchmarks=colsum,adamw,...]

colsum: a column sum (reduce over the leading axis) against the same sum as a ones-vector
matmul, the reason for gptjax.backends.xla_cpu.fast_paths.sum_leading_axes.
adamw: optax's clip + AdamW update, the same with gptjax's clip (fast_paths.clip_by_global_norm,
the clipping as one scalar factor), and the update written as one expression per parameter
(buffers donated in all three), on a parameter list shaped like t5:small's.
matmul_dtypes: 2048 x 2048 matmuls in float32 and bfloat16 through XLA and through PyTorch.
batched_dot: gpt:small's attention score matmul ([16, 4] x 128 x 64 x 128) through XLA, through
gptjax's per-head matmul kernel (gptjax/backends/xla_cpu/kernels.py) and torch.bmm (run it under
`taskset -c 0` too: XLA's figure does not change on one core).
attention: forward+backward of one gpt:small layer's causal attention core: XLA einsums, the same
in causal query blocks, with the per-head matmul kernel, the fused attention kernel without and
with block skipping, PyTorch's causal scaled_dot_product_attention.
cross_entropy: the tied vocabulary projection and loss of a gpt:small batch, whole and in
token chunks, forward+backward.
qkv: three [2048, 256] x [256, 256] projections against one [256, 768], forward+backward.
wgrad_layouts: weight-gradient products x^T @ g with the transpose folded into the dot (Eigen)
and kept as a copy (YNNPACK).
attention_layouts: gpt:small's causal attention core as gptjax computes it, heads-major, and
split into independent pieces by batch or heads.
gelu_backward: one MLP block with jax.nn.gelu, two hand-written GELU backwards, and ReLU.
log_partition: the loss on gpt:small logits by autodiff and with a backward that recomputes exp.
elementwise_kernels: forward+backward of gpt:small's LayerNorm ([2048, 256]), bias+GELU (tanh and
exact, [2048, 1024]) and loss ([2048, 8192] logits) through gptjax's CPU kernels and as XLA
fusions (the `cpu_norm`, `cpu_bias_gelu` and `cpu_cross_entropy` tricks off). Run it twice:
the first figures of a process include the heap's growth.
remat_memory: compiled temporaries of a 16-layer gradient with and without jax.checkpoint.
The cases that run gptjax's own kernels and tricks (batched_dot, attention, attention_layouts,
elementwise_kernels) are in cpu_microbench_kernels.py, the timing in cpu_microbench_timing.py.
Each figure is the mean of --repeats calls after one warm-up call. PyTorch (a test and benchmark
dependency, installed by `make install-test`) runs with its default threads.
"""

import math
import pathlib
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gptjax.backends.xla_cpu import fast_paths  # pylint: disable=g-import-not-at-top
from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
from gptjax.model.ops import XLA  # pylint: disable=g-import-not-at-top

from experiments.cpu_microbench_kernels import (  # pylint: disable=g-import-not-at-top
    B, L, attention, attention_layouts, batched_dot, elementwise_kernels)
from experiments.cpu_microbench_timing import timed, timed_torch  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list("benchmarks", ["colsum", "adamw", "matmul_dtypes", "batched_dot",
                                 "dense_matmuls", "attention",
                                 "cross_entropy", "qkv", "wgrad_layouts", "attention_layouts",
                                 "gelu_backward", "log_partition", "elementwise_kernels",
                                 "remat_memory"],
                  "Which micro-benchmarks to run.")


def colsum() -> None:
  """Column sums as a reduce and as a matrix-vector product."""
  for shape in [(2048, 8192), (2048, 1024), (16, 4 * 128 * 128)]:
    x = jax.random.normal(jax.random.key(0), shape)
    reduce_ms = timed(jax.jit(lambda x: x.sum(0)), x)
    matvec_ms = timed(jax.jit(lambda x: jnp.ones((x.shape[0],), x.dtype) @ x), x)
    print(f"colsum {shape}: reduce {reduce_ms:.3f} ms, ones @ x {matvec_ms:.3f} ms")


def adamw() -> None:
  """One clip + AdamW update three ways: optax, optax with gptjax's clip, one expression."""
  shapes = [(8192, 256)] + [(256, 1024), (1024, 256)] + [(256, 256)] * 4 + [(256,)] * 2
  shapes = shapes[:1] + shapes[1:] * 10
  params = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)]
  grads = [0.01 * jax.random.normal(jax.random.key(100 + i), s) for i, s in enumerate(shapes)]
  lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.1

  def optax_ms(clip) -> float:
    tx = optax.chain(clip(1.0), optax.adamw(lr, b1, b2, eps, weight_decay=wd))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = [[x + 0 for x in params], None]
    state[1] = tx.init(state[0])

    def run():
      state[0], state[1] = jitted(state[0], state[1], grads)
      return state[0]
    return timed(run)

  def fused_step(state, g):
    p, mu, nu, count = state
    scale = jnp.minimum(1.0, 1.0 / (optax.tree.norm(g) + 1e-12))
    count = count + 1
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
    mu = [b1 * m + (1 - b1) * gi * scale for m, gi in zip(mu, g)]
    nu = [b2 * n + (1 - b2) * jnp.square(gi * scale) for n, gi in zip(nu, g)]
    p = [pi - lr * ((m / bc1) / (jnp.sqrt(n / bc2) + eps) + wd * pi)
         for pi, m, n in zip(p, mu, nu)]
    return p, mu, nu, count

  step_b = jax.jit(fused_step, donate_argnums=0)
  zeros = lambda: [jnp.zeros_like(x) for x in params]
  state_b = [([x + 0 for x in params], zeros(), zeros(), jnp.zeros((), jnp.int32))]

  def run_b():
    state_b[0] = step_b(state_b[0], grads)
    return state_b[0][0]

  n = sum(x.size for x in params)
  print(f"adamw ({n / 1e6:.1f}M parameters): optax {optax_ms(optax.clip_by_global_norm):.2f} ms, "
        f"optax with gptjax's clip {optax_ms(fast_paths.clip_by_global_norm):.2f} ms, "
        f"one expression per parameter {timed(run_b):.2f} ms")


def matmul_dtypes() -> None:
  """TFLOP/s of a 2048 x 2048 matmul per dtype, XLA against PyTorch (which uses AMX if any)."""
  import torch  # pylint: disable=g-import-not-at-top
  n = 2048
  for name, jdt, tdt in (("float32", jnp.float32, torch.float32),
                         ("bfloat16", jnp.bfloat16, torch.bfloat16)):
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(jdt)
    b = torch.randn(n, n).to(tdt)
    xla = 2 * n ** 3 / timed(jax.jit(lambda a: a @ a), a) / 1e9
    pt = 2 * n ** 3 / timed_torch(lambda: b @ b) / 1e9
    print(f"matmul {name}: XLA {xla:.3f} TFLOP/s, PyTorch {pt:.3f} TFLOP/s")


def dense_matmuls() -> None:
  """GFLOP/s of gpt:small's Dense products (forward, input and weight gradient): XLA and torch."""
  import torch  # pylint: disable=g-import-not-at-top
  tokens = B * L
  dot = lambda ca, cb: jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ()))))
  print(f"Dense products at {tokens} tokens, GFLOP/s: XLA dot / torch (MKL), "
        f"{torch.get_num_threads()} torch threads")
  for d_in, d_out in ((256, 256), (256, 1024), (1024, 256), (256, 8192)):
    x, g = jax.random.normal(jax.random.key(0), (tokens, d_in)), jnp.ones((tokens, d_out))
    w = jax.random.normal(jax.random.key(1), (d_in, d_out))
    tx, tw, tg = torch.randn(tokens, d_in), torch.randn(d_in, d_out), torch.randn(tokens, d_out)
    cells = []
    for name, (ca, cb, args, torch_fn) in {"x w": (1, 0, (x, w), lambda: tx @ tw),
                                           "g w^T": (1, 1, (g, w), lambda: tg @ tw.T),
                                           "x^T g": (0, 0, (x, g), lambda: tx.T @ tg)}.items():
      flop = 2 * tokens * d_in * d_out / 1e6
      cells.append(f"{name} {flop / timed(dot(ca, cb), *args):.0f} / "
                   f"{flop / timed_torch(torch_fn):.0f}")
    print(f"  [{d_in}, {d_out}]: " + ";  ".join(cells))


def cross_entropy() -> None:
  """ms per forward+backward of gpt:small's vocabulary projection and loss, whole and chunked."""
  t, d, v = 2048, 256, 8192
  x = jax.random.normal(jax.random.key(0), (t, d))
  table_t = 0.02 * jax.random.normal(jax.random.key(1), (d, v))
  targets = jax.random.randint(jax.random.key(2), (t,), 0, v)

  def loss(x, table_t, targets):
    logits = x @ table_t
    return jnp.sum(jax.nn.logsumexp(logits, -1) -
                   jnp.take_along_axis(logits, targets[:, None], -1)[:, 0])

  def chunked(n):
    c = t // n
    return lambda x, e, y: sum(loss(x[i * c:(i + 1) * c], e, y[i * c:(i + 1) * c])
                               for i in range(n))

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  times = {n: timed(grad(chunked(n) if n > 1 else loss), x, table_t, targets) for n in (1, 2, 4, 8)}
  print("cross-entropy fwd+bwd [2048 x 256] x [256 x 8192]: " +
        ", ".join(f"{n} chunk{'s' if n > 1 else ''} {ms:.1f} ms" for n, ms in times.items()))


def qkv() -> None:
  """ms per forward+backward of the query/key/value projections, separate against one matmul."""
  x = jax.random.normal(jax.random.key(0), (2048, 256))
  ws = [jax.random.normal(jax.random.key(i), (256, 256)) for i in range(1, 4)]
  gs = [jax.random.normal(jax.random.key(i), (2048, 256)) for i in range(4, 7)]
  separate = lambda x, ws: [x @ w for w in ws]
  fused = lambda x, ws: jnp.split(x @ jnp.concatenate(ws, 1), 3, axis=1)

  def fwd_bwd(f):
    def run(x, ws):
      _, vjp = jax.vjp(f, x, ws)
      return vjp(gs)
    return jax.jit(run)

  print(f"qkv fwd+bwd: three matmuls {timed(fwd_bwd(separate), x, ws):.2f} ms, "
        f"one {timed(fwd_bwd(fused), x, ws):.2f} ms")


def wgrad_layouts() -> None:
  """Weight-gradient products x^T @ g as XLA folds them (Eigen) and with x^T kept (YNNPACK)."""
  for t, i, o in [(2048, 256, 256), (2048, 256, 1024), (2048, 1024, 256), (2048, 256, 8192)]:
    x = jax.random.normal(jax.random.key(0), (t, i))
    g = jax.random.normal(jax.random.key(1), (t, o))
    folded = timed(jax.jit(lambda x, g: x.T @ g), x, g)
    kept = timed(jax.jit(lambda x, g: jax.lax.optimization_barrier(x.T) @ g), x, g)
    print(f"wgrad [{t}, {i}]^T x [{t}, {o}]: transpose folded (Eigen) {folded:.2f} ms, "
          f"x^T kept (YNNPACK) {kept:.2f} ms")


def gelu_backward() -> None:
  """ms per fwd+bwd of one gpt:small MLP block with GELU as autodiff, two hand-written, ReLU."""
  c = math.sqrt(2 / math.pi)
  inner = lambda z: c * (z + 0.044715 * z ** 3)
  d_gelu = lambda z, t: 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)

  def custom(save_tanh):
    @jax.custom_vjp
    def gelu(z):
      return 0.5 * z * (1 + jnp.tanh(inner(z)))

    def fwd(z):
      t = jnp.tanh(inner(z))
      return 0.5 * z * (1 + t), (z, t if save_tanh else None)

    def bwd(res, gr):
      z, t = res
      return (gr * d_gelu(z, jnp.tanh(inner(z)) if t is None else t),)

    gelu.defvjp(fwd, bwd)
    return gelu

  h = jax.random.normal(jax.random.key(0), (2048, 256))
  w1 = 0.06 * jax.random.normal(jax.random.key(1), (256, 1024))
  w2 = 0.03 * jax.random.normal(jax.random.key(2), (1024, 256))
  mlp = lambda act: jax.jit(jax.grad(lambda h, w1, w2: jnp.sum((act(h @ w1) @ w2) ** 2),
                                     argnums=(0, 1, 2)))
  acts = {"jax.nn.gelu": lambda z: jax.nn.gelu(z, approximate=True),
          "tanh saved": custom(True), "tanh recomputed": custom(False), "relu": jax.nn.relu}
  print("MLP fwd+bwd [2048, 256] -> 1024 -> 256: " + ", ".join(
      f"{name} {timed(mlp(act), h, w1, w2):.2f} ms" for name, act in acts.items()))


def log_partition() -> None:
  """ms per fwd+bwd of the loss alone on gpt:small logits: autodiff against a recompute backward."""
  from gptjax.training import objectives  # pylint: disable=g-import-not-at-top

  @jax.custom_vjp
  def log_z(l):
    m = jax.lax.stop_gradient(jnp.max(l, axis=-1))
    return m + jnp.log(jnp.sum(jnp.exp(l - m[..., None]), axis=-1))

  log_z.defvjp(lambda l: (log_z(l), (l, log_z(l))),
               lambda res, gr: (jnp.exp(res[0] - res[1][..., None]) * gr[..., None],))
  logits = 3 * jax.random.normal(jax.random.key(0), (16, 128, 8192))
  targets = jax.random.randint(jax.random.key(1), (16, 128), 0, 8192)
  weights = jnp.ones((16, 128))

  def recompute(l):
    target = jnp.take_along_axis(l, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(log_z(l) - target)

  grad = lambda f: jax.jit(jax.value_and_grad(f))
  autodiff = grad(lambda l: objectives.cross_entropy(l, targets, weights, XLA)[0])
  print(f"loss fwd+bwd [2048 x 8192]: gptjax (autodiff) {timed(autodiff, logits):.2f} ms, "
        f"exp recomputed in the backward {timed(grad(recompute), logits):.2f} ms")


def remat_memory() -> None:
  """Temporary buffers of a 16-layer gradient without and with jax.checkpoint on this backend."""
  ws = [0.01 * jnp.ones((512, 512)) for _ in range(16)]
  x = jnp.ones((4096, 512))

  def temp_mib(remat, prevent_cse=True):
    layer = lambda w, h: jnp.tanh(h @ w)
    if remat:
      layer = jax.checkpoint(layer, prevent_cse=prevent_cse)

    def net(ws, h):
      for w in ws:
        h = layer(w, h)
      return jnp.sum(h)
    compiled = jax.jit(jax.grad(net)).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20

  print(f"remat temporaries, 16 layers [4096, 512]: none {temp_mib(False):.0f} MiB, "
        f"jax.checkpoint {temp_mib(True):.0f} MiB, "
        f"jax.checkpoint(prevent_cse=False) {temp_mib(True, False):.0f} MiB")


BENCHMARKS = {"colsum": colsum, "adamw": adamw, "matmul_dtypes": matmul_dtypes,
              "batched_dot": batched_dot, "dense_matmuls": dense_matmuls, "attention": attention,
              "cross_entropy": cross_entropy,
              "qkv": qkv, "wgrad_layouts": wgrad_layouts, "attention_layouts": attention_layouts,
              "gelu_backward": gelu_backward, "log_partition": log_partition,
              "elementwise_kernels": elementwise_kernels, "remat_memory": remat_memory}


def main(argv):
  del argv
  host_memory.configure()  # the XLA:CPU malloc settings, as in training; before JAX starts threads
  unknown = [b for b in FLAGS.benchmarks if b not in BENCHMARKS]
  if unknown:
    raise SystemExit(f"error: --benchmarks={','.join(unknown)} is unknown; choose from "
                     f"{', '.join(BENCHMARKS)}")
  for name in FLAGS.benchmarks:
    BENCHMARKS[name]()


if __name__ == "__main__":
  app.run(main)
