"""The micro-benchmarks of gptjax's own XLA:CPU kernels and tricks (gptjax/backends/xla_cpu),
each against plain XLA and PyTorch: the attention score matmul, the attention core and its
layouts, and the norm, bias+GELU and loss kernels. experiments/cpu_microbench.py runs them.
"""

import jax
import jax.numpy as jnp

from gptjax.backends.xla_cpu import fast_paths
from gptjax.backends.xla_cpu import ops as xla_cpu_ops
from gptjax.model import attention as attention_core
from gptjax.model import layers
from gptjax.training import objectives

from experiments.cpu_microbench_timing import timed, timed_torch

B, H, L, DH = 16, 4, 128, 64  # gpt:small's attention


def cpu_ops(**switches):
  """The xla_cpu ops with every trick on but those given as False (gptjax/backends/xla_cpu/ops.py)."""
  return xla_cpu_ops.make_ops(frozenset(name for name, on in switches.items() if not on))


def batched_dot() -> None:
  """GFLOP/s of the attention score matmul: XLA's batched dot, gptjax's kernel, torch.bmm."""
  import torch  # pylint: disable=g-import-not-at-top
  from gptjax.backends.xla_cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top
  q, k = (jax.random.normal(jax.random.key(i), (B, H, L, DH)) for i in range(2))
  tq, tk = torch.randn(B, H, L, DH), torch.randn(B, H, L, DH)
  flop = 2 * B * H * L * L * DH
  xla = flop / timed(jax.jit(lambda q, k: jnp.einsum("bhld,bhsd->bhls", q, k)), q, k) / 1e6
  ql, kl = (x.transpose(0, 2, 1, 3) for x in (q, k))  # gptjax's token-major [B, L, H, Dh]
  kernel = flop / timed(jax.jit(lambda q, k: cpu_kernels.head_einsum("blhd,bshd->bhls", q, k)),
                        ql, kl) / 1e6
  pt = flop / timed_torch(lambda: tq @ tk.transpose(-1, -2)) / 1e6
  print(f"batched dot [{B}, {H}] x {L} x {DH} x {L}: XLA {xla:.0f} GFLOP/s, "
        f"gptjax.backends.xla_cpu.kernels.head_einsum {kernel:.0f} GFLOP/s, torch.bmm {pt:.0f} GFLOP/s")


def attention() -> None:
  """ms per forward+backward of one gpt:small layer's causal attention core, five ways."""
  import torch  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  q, k, v, g = (jax.random.normal(jax.random.key(i), (B, L, H, DH)) for i in range(4))
  mask = models.build_mask(None, True, L)

  def fwd_bwd(**switches):
    ops = cpu_ops(**switches)
    def f(q, k, v):
      attend = lambda q, k, v: ops.attention(q, k, v, mask, None, DH ** -0.5, "einsum",
                                             mask_is_causal=True)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(g)
    return timed(jax.jit(f), q, k, v)

  xla = dict(cpu_head_matmul=False, cpu_fused_attention=False)
  rows = {
      "XLA einsums": fwd_bwd(causal_blocks=False, **xla),
      f"XLA einsums in {xla_cpu_ops.causal_query_blocks(L, L)} causal query blocks":
          fwd_bwd(causal_blocks=True, **xla),
      "per-head matmul kernel, query blocks": fwd_bwd(cpu_head_matmul=True,
                                                      cpu_fused_attention=False),
      "fused kernel, no block skipping": fwd_bwd(causal_blocks=False, cpu_fused_attention=True),
      "fused kernel, causal blocks skipped (gptjax's default)": fwd_bwd(),
  }
  tq, tk, tv = (torch.randn(B, H, L, DH, requires_grad=True) for _ in range(3))
  tg = torch.randn(B, H, L, DH)

  def torch_fwd_bwd():
    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tg)

  rows["PyTorch causal SDPA"] = timed_torch(torch_fwd_bwd)
  print(f"attention fwd+bwd [{B}, {L}, {H}, {DH}], causal:")
  for name, ms in rows.items():
    print(f"  {name}: {ms:.2f} ms")


def attention_layouts() -> None:
  """ms per fwd+bwd of gpt:small's causal attention core: gptjax's blocks, heads-major, split."""
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  q, k, v, g = (jax.random.normal(jax.random.key(i), (B, L, H, DH)) for i in range(4))
  mask = models.build_mask(None, True, L)
  attend = lambda q, k, v, m: cpu_ops().attention(q, k, v, m, None, DH ** -0.5, "einsum",
                                                  mask_is_causal=True)  # kernels=xla_cpu

  def heads_major(q, k, v, m):  # one [B, H, L, Dh] copy of q, k, v; two causal query blocks
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    c = L // 2
    outs = []
    for i in range(2):
      s = jnp.einsum("bhld,bhsd->bhls", qt[:, :, i * c:(i + 1) * c], kt[:, :, :(i + 1) * c])
      s = jnp.where(m[:, :, i * c:(i + 1) * c, :(i + 1) * c], s * DH ** -0.5, attention_core.NEG_INF)
      p = fast_paths.softmax_last_axis(s)
      outs.append(jnp.einsum("bhls,bhsd->bhld", p, vt[:, :, :(i + 1) * c]))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)

  def split(n, axis):  # independent pieces the thunk executor could run side by side
    def f(q, k, v, m):
      parts = zip(*(jnp.split(x, n, axis=axis) for x in (q, k, v)))
      return jnp.concatenate([attend(a, b, c, m) for a, b, c in parts], axis=axis)
    return f

  def fwd_bwd(f):
    def run(q, k, v):
      _, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
      return vjp(g)
    return jax.jit(run)

  variants = {"gptjax (kernels=xla_cpu)": attend, "heads-major": heads_major,
              "split by batch in 2": split(2, 0), "split by heads in 2": split(2, 2),
              "split by heads in 4": split(4, 2)}
  print("attention layouts fwd+bwd: " + ", ".join(
      f"{name} {timed(fwd_bwd(f), q, k, v):.2f} ms" for name, f in variants.items()))


def elementwise_kernels() -> None:
  """ms per fwd+bwd of a norm, bias+GELU and the loss, as gptjax's CPU kernels and as XLA."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2048, 256))
  norm_params = layers.Norm().init(keys[1], x)
  h = jax.random.normal(keys[2], (2048, 1024))
  bias = jnp.zeros((1024,))
  logits = 3 * jax.random.normal(keys[3], (2048, 8192))
  targets = jnp.arange(2048) % 8192
  weights = jnp.ones((2048,))

  def gelu(approximate):  # what the MLP's bias + GELU runs with the trick on and off
    return lambda ops: lambda v, b: jnp.sum(ops.bias_gelu(v, b, approximate) * v)
  cases = [("LayerNorm", "cpu_norm",
            lambda ops: lambda p, v: jnp.sum(layers.Norm(ops=ops).apply(p, v) * v),
            (norm_params, x)),
           ("bias+GELU tanh", "cpu_bias_gelu", gelu(True), (h, bias)),
           ("bias+GELU exact", "cpu_bias_gelu", gelu(False), (h, bias)),
           ("loss", "cpu_cross_entropy",
            lambda ops: lambda v: objectives.cross_entropy(v, targets, weights, ops)[0], (logits,))]
  for name, switch, loss, args in cases:
    times = {}
    for on in (True, False):
      fn = loss(cpu_ops(**{switch: on}))
      times[on] = timed(jax.jit(jax.grad(fn, argnums=tuple(range(len(args))))), *args)
    print(f"{name} fwd+bwd: kernel {times[True]:.2f} ms, XLA {times[False]:.2f} ms")
