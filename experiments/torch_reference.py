"""gptjax's GPT train step against the same model in eager PyTorch, timed in one process.

  python experiments/torch_reference.py --variants=small
  python experiments/torch_reference.py --variants=gpt2_124m_t128

The performance issue sets gptjax against nanoGPT-style eager PyTorch. Quoted figures from another
machine say little here, and this machine's speed drifts between processes, so both steps run in
this process, in alternating rounds of --steps steps, and the ratio of their medians is reported.
PyTorch's OpenMP workers spin after each of its parallel regions and compete with XLA's threads
for the cores; `OMP_WAIT_POLICY=PASSIVE` stops that (at some cost to PyTorch), or
`--only=gptjax` / `--only=pytorch` time each alone, in separate processes run alternately.

The PyTorch model is written here in nanoGPT's style with the shape of configs/gpt.py's variant:
learned positions, pre-LN blocks with biases, tanh-GELU MLP, causal
`F.scaled_dot_product_attention`, tied output layer; AdamW (torch's default multi-tensor
implementation) with global-norm clipping and decay on matrices only, as gptjax trains. Both run
in float32 on random token ids (speed does not depend on their values). Before timing, gptjax's
initial weights are copied into the PyTorch model and both must give the same logits, so the two
steps compute the same function.
"""

import math
import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the script form
from experiments import throughput  # pylint: disable=g-import-not-at-top  (also defines --steps, ...)

from gptjax.training import flops  # pylint: disable=g-import-not-at-top

from gptjax.model import models

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Alternating timed rounds of --steps steps per implementation.")
flags.DEFINE_enum("only", "both", ["both", "gptjax", "pytorch"],
                  "Time one implementation only (run the other in a separate process): in one "
                  "process, PyTorch's OpenMP workers keep spinning after each PyTorch step and "
                  "take the cores from XLA's threads unless OMP_WAIT_POLICY=PASSIVE is set.")


class Block(nn.Module):
  """Pre-LN transformer block: causal self-attention and a GELU MLP, each with a residual."""

  def __init__(self, d: int, heads: int, mlp: int, eps: float, scale=None):
    super().__init__()
    self.heads, self.scale = heads, scale
    self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.fc, self.out = nn.Linear(d, mlp), nn.Linear(mlp, d)

  def forward(self, x_BxLxD):
    b, l, d = x_BxLxD.shape
    q, k, v = self.qkv(self.ln1(x_BxLxD)).split(d, dim=2)
    heads = lambda t: t.view(b, l, self.heads, d // self.heads).transpose(1, 2)
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                       scale=self.scale)
    x_BxLxD = x_BxLxD + self.proj(y.transpose(1, 2).contiguous().view(b, l, d))
    return x_BxLxD + self.out(F.gelu(self.fc(self.ln2(x_BxLxD)), approximate="tanh"))


class TorchGPT(nn.Module):
  """GPT-2-style decoder with a tied output layer (nanoGPT's layout)."""

  def __init__(self, cfg):
    super().__init__()
    self.tok = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
    self.pos = nn.Embedding(cfg.max_len, cfg.embed_dim)
    scale = None if cfg.scale_attention else 1.0
    self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.norm_eps, scale)
                                for _ in range(cfg.num_layers))
    self.ln_f = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith(("proj.weight", "out.weight")) \
            else 0.02
        nn.init.normal_(p, std=std)

  def forward(self, ids_BxL):
    pos = torch.arange(ids_BxL.shape[1])
    x = self.tok(ids_BxL) + self.pos(pos)
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.tok.weight.T


def load_gptjax_params(model: TorchGPT, params) -> None:
  """Copies a gptjax GPT's parameters (tied embedding, learned positions) into `model`."""
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())
  flat = lambda x: np.asarray(x).reshape(x.shape[0], -1)  # [D, H, Dh] -> [D, H*Dh]
  dec = params["decoder"]
  with torch.no_grad():
    model.tok.weight.copy_(t(params["token_embed"]["embedding"]))
    model.pos.weight.copy_(t(dec["pos_embed"]["embedding"]))
    model.ln_f.weight.copy_(t(dec["final_norm"]["scale"]))
    model.ln_f.bias.copy_(t(dec["final_norm"]["bias"]))
    for i, block in enumerate(model.blocks):
      layer = dec[f"layers_{i}"]
      attn = layer["self_attn"]
      qkv = [attn[n] for n in ("query", "key", "value")]
      block.qkv.weight.copy_(t(np.concatenate([flat(m["kernel"]) for m in qkv], axis=1).T))
      block.qkv.bias.copy_(t(np.concatenate([np.ravel(m["bias"]) for m in qkv])))
      out = np.asarray(attn["out"]["kernel"])
      block.proj.weight.copy_(t(out.reshape(-1, out.shape[-1]).T))
      block.proj.bias.copy_(t(attn["out"]["bias"]))
      for ln, name in ((block.ln1, "self_attn_norm"), (block.ln2, "mlp_norm")):
        ln.weight.copy_(t(layer[name]["scale"]))
        ln.bias.copy_(t(layer[name]["bias"]))
      for lin, name in ((block.fc, "wi"), (block.out, "wo")):
        lin.weight.copy_(t(np.asarray(layer["mlp"][name]["kernel"]).T))
        lin.bias.copy_(t(layer["mlp"][name]["bias"]))


def check_same_function(model: TorchGPT, model_cfg, params, seq_len: int) -> float:
  """Largest |logit difference| of gptjax and PyTorch on one batch with gptjax's weights."""
  ids = np.random.default_rng(1).integers(5, model_cfg.vocab_size, (2, seq_len))
  jax_logits = models.make_model(model_cfg).apply({"params": params}, inputs=ids)["logits"]
  load_gptjax_params(model, params)
  with torch.no_grad():
    torch_logits = model(torch.from_numpy(ids)).numpy()
  diff = float(np.max(np.abs(np.asarray(jax_logits) - torch_logits)))
  if not diff < 1e-3 * max(1.0, float(np.max(np.abs(torch_logits)))):
    raise SystemExit(f"error: PyTorch and gptjax logits differ by {diff:.3g} with the same "
                     "weights; the two models are not the same function")
  return diff


def torch_step_fn(config):
  """(model, one train step) for gptjax's config: forward, loss, backward, clip, AdamW."""
  torch.manual_seed(0)
  model = TorchGPT(config.model)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  t = config.train
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=t.learning_rate, betas=(t.b1, t.b2))
  rng = np.random.default_rng(0)
  b, l, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  batches = [(torch.from_numpy(rng.integers(5, v, (b, l))), torch.from_numpy(rng.integers(5, v, (b, l))))
             for _ in range(2)]

  def step(i: int) -> float:
    inputs, targets = batches[i % 2]
    logits = model(inputs)
    loss = F.cross_entropy(logits.view(-1, v), targets.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss

  return model, step


def time_torch(step, n: int) -> float:
  """Seconds per PyTorch step over `n` steps (eager: each step finishes before the next)."""
  t0 = time.perf_counter()
  for i in range(n):
    loss = step(i)
  float(loss.detach())
  return (time.perf_counter() - t0) / n


def compare(variant: str) -> dict:
  """Median step times of gptjax and PyTorch for one GPT variant, alternating rounds."""
  c, cfg, mesh, jax_step, state, batches, _ = throughput.build("gpt", variant)
  model, torch_step = torch_step_fn(c)
  n_torch = sum(p.numel() for p in model.parameters())
  n_jax = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  if n_torch != n_jax:
    raise SystemExit(f"error: the PyTorch model has {n_torch} parameters, gptjax's {n_jax}; "
                     "the two models must have the same shape")
  diff = check_same_function(model, cfg, jax.device_get(state.params), c.data.seq_len)
  times = {"gptjax": [], "pytorch": []}
  with jax.set_mesh(mesh):
    _, state = throughput.run_steps(jax_step, state, batches, 1 + FLAGS.warmup_steps)
    if FLAGS.only != "pytorch":  # until the heap has grown to hold the overlapping steps
      state, _ = throughput.warm_up_heap(jax_step, state, batches)
    if FLAGS.only != "gptjax":
      time_torch(torch_step, FLAGS.warmup_steps)
    for _ in range(FLAGS.rounds):
      if FLAGS.only != "pytorch":
        dt, state = throughput.run_steps(jax_step, state, batches, FLAGS.steps)
        times["gptjax"].append(dt)
      if FLAGS.only != "gptjax":
        times["pytorch"].append(time_torch(torch_step, FLAGS.steps))
  b, l = c.data.batch_size, c.data.seq_len
  flop = flops.train_flops_per_example(cfg, l, 0, c.objective) * b
  med = {k: float(np.median(v)) if v else float("nan") for k, v in times.items()}
  return {"variant": variant, "params": n_jax, "tokens": b * l, "flop": flop, "logit_diff": diff,
          **med}


def main(argv):
  del argv
  peak = flops.measure_matmul_peak(jax.numpy.float32, n=2048)
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"XLA float32 matmul peak {peak / 1e12:.3f} TFLOP/s")
  print("| model | params | gptjax tokens/s | PyTorch eager tokens/s | gptjax / PyTorch | "
        "gptjax MFU | PyTorch MFU | max logit diff |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for variant in FLAGS.variants:
    r = compare(variant)
    peak = max(peak, flops.measure_matmul_peak(jax.numpy.float32, n=2048))
    tok = {k: r["tokens"] / r[k] for k in ("gptjax", "pytorch")}
    mfu = {k: r["flop"] / r[k] / peak for k in ("gptjax", "pytorch")}
    print(f"| gpt:{variant} | {r['params'] / 1e6:.1f}M | {tok['gptjax']:.0f} | "
          f"{tok['pytorch']:.0f} | {tok['gptjax'] / tok['pytorch']:.2f}x | "
          f"{100 * mfu['gptjax']:.1f}% | {100 * mfu['pytorch']:.1f}% | {r['logit_diff']:.1e} |",
          flush=True)
  print(f"MFU of each row against the highest XLA float32 matmul peak measured up to it "
        f"(last: {peak / 1e12:.3f} TFLOP/s)")


if __name__ == "__main__":
  flags.FLAGS.set_default("variants", ["small"])
  app.run(main)
