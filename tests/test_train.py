"""The train loop: metrics, exact resume (mesh and pmap), signals, NaN, corrupt checkpoints."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from gptjax.training import checkpointing
from gptjax import config_schema
from gptjax.training import train

TINY = {"train.log_every": 1, "train.eval_every": 0, "train.progress": False}


def _losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line still being written
        continue
      if "loss" in r and "eval_loss" not in r:
        out[r["step"]] = r["loss"]
  return out


def _params(workdir):
  _, params, _ = checkpointing.restore_for_inference(str(workdir))
  return jax.tree.leaves(jax.device_get(params))


def _run_cli(workdir, *overrides, timeout=300):
  cmd = [sys.executable, str(REPO / "run.py"), "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}", "--mode=train", "--config.train.progress=False", *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_writes_metrics_and_a_loadable_checkpoint(tmp_path):
  result = _run_cli(tmp_path / "w", "--config.train.steps=20")
  assert result.returncode == 0, result.stderr[-2000:]
  losses = _losses(tmp_path / "w")
  assert sorted(losses)[-1] == 20
  assert losses[20] < losses[min(losses)]
  records = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  train_records = [r for r in records if "loss" in r and "eval_loss" not in r]
  assert all("tokens_per_sec" in r for r in train_records)
  # on CPU, MFU is against a matmul peak measured in this run, and each record says so
  assert all(r["peak_source"] == "measured" and r["peak_flops"] > 0 and 0 < r["mfu"]
             for r in train_records)
  manifest = json.load(open(tmp_path / "w" / "manifest.json"))
  for key in ("config", "git_commit", "versions", "devices", "data_fingerprint",
              "tokenizer_fingerprint"):
    assert key in manifest
  # the unigram loss is the entropy of the token distribution: between 0 and ln(vocab)
  assert 0 < manifest["unigram_baseline_loss"] < np.log(512)
  assert "unigram baseline: loss" in result.stdout
  assert any(p.name.startswith("events") for p in (tmp_path / "w" / "tensorboard").iterdir())


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_ten_then_twenty_steps_equal_twenty_straight(tmp_path, mode):
  base = dict(TINY, **{"train.decay_steps": 20, "train.ckpt_every": 10,
                       "parallelism.mode": mode})
  straight = tmp_path / "straight"
  train.train_and_evaluate(load_config("gpt", "tiny", **base, **{"train.steps": 20}), str(straight))
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(load_config("gpt", "tiny", **base, **{"train.steps": 10}), str(resumed))
  train.train_and_evaluate(load_config("gpt", "tiny", **base, **{"train.steps": 20}), str(resumed))
  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  np.testing.assert_array_equal([a[s] for s in sorted(a)], [b[s] for s in sorted(b)])
  for x, y in zip(_params(straight), _params(resumed)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_the_rerun_continues(tmp_path, capsys):
  w = tmp_path / "w"
  cmd = [sys.executable, str(REPO / "run.py"), "--config=configs/gpt.py:tiny", f"--workdir={w}",
         "--mode=train", "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.progress=False", "--config.train.eval_every=0",
         "--config.train.ckpt_every=100000"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    if (w / "metrics.jsonl").exists() and len(_losses(w)) >= 5:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 4, out[-2000:]  # saved but not finished
  assert "received SIGTERM" in out
  steps = checkpointing.Checkpointer(str(w), read_only=True, async_save=False).steps()
  assert steps and steps[-1] >= 5
  capsys.readouterr()
  metrics = train.train_and_evaluate(load_config("gpt", "tiny", **{  # the rerun, in this process
      "train.steps": steps[-1] + 3, "train.log_every": 1, "train.progress": False,
      "train.eval_every": 0, "train.ckpt_every": 100000}), str(w))
  out = capsys.readouterr().out
  assert metrics["step"] == steps[-1] + 3 and not metrics.get("stopped_by")
  assert "resumed from" in out and f"at step {steps[-1]}" in out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  w = tmp_path / "w"  # the good run in this process; the diverging one through run.py (exit 3)
  train.train_and_evaluate(load_config("gpt", "tiny", **{"train.progress": False,
                                                         "train.steps": 10,
                                                         "train.ckpt_every": 10}), str(w))
  result = _run_cli(w, "--config.train.steps=40", "--config.train.learning_rate=1e30",
                    "--config.train.grad_clip=0.0", "--config.train.warmup_steps=0",
                    "--config.train.ckpt_every=40")
  assert result.returncode == 3, result.stdout[-1000:] + result.stderr[-1000:]
  line = [l for l in result.stderr.splitlines() if l.startswith("error:")][-1]
  assert "loss is" in line and "step 10" in line
  ckpt = checkpointing.Checkpointer(str(w), read_only=True, async_save=False)
  assert ckpt.steps() == [10]
  _, params, _ = checkpointing.restore_for_inference(str(w))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(params)))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  w = tmp_path / "w"
  config = load_config("gpt", "tiny", **TINY, **{"train.steps": 20, "train.ckpt_every": 10})
  train.train_and_evaluate(config, str(w))
  state_dir = w / "checkpoints" / "20" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\x00garbage")
  config = load_config("gpt", "tiny", **TINY, **{"train.steps": 25, "train.ckpt_every": 10})
  metrics = train.train_and_evaluate(config, str(w))
  assert metrics["step"] == 25
  losses = _losses(w)
  assert 11 in losses and 25 in losses


@pytest.mark.parametrize("overrides,needle", [
    ({"train.grad_accum": 3}, "config.data.batch_size=8 does not divide"),
    ({"parallelism.data": 3}, "config.parallelism data*fsdp*tensor=3"),
])
def test_bad_parallel_settings_fail_before_compiling(tmp_path, overrides, needle):
  config = load_config("gpt", "tiny", **TINY, **overrides)
  with pytest.raises(config_schema.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert needle in str(e.value) and "\n" not in str(e.value)




OBJECTIVE_RUNS = [
    ("gpt", "next_token", {}), ("gpt", "prefix_lm", {}),
    ("bert", "mlm", {}), ("bert", "mlm_nsp", {}),
    ("t5", "span_corruption", {}), ("bart", "denoise", {}),
    # T5's optimizer: its factored statistics of each matrix have their own (replicated) shardings
    ("t5", "span_corruption", {"train.optimizer": "adafactor", "train.learning_rate": 1e-2}),
    # 16 sst2 sentences seen 8 times: their loss must fall (16 fresh batches of 8 are noise).
    ("bert", "classification", {"model.num_classes": 2, "data.corpus": "sst2",
                                "data.max_docs": 16}),
    ("gpt", "classification", {"model.num_classes": 2, "data.corpus": "sst2",
                               "data.max_docs": 16}),
]


@pytest.mark.parametrize("family,objective,extra", OBJECTIVE_RUNS,
                         ids=[f"{f}-{o}" + ("-" + e["train.optimizer"] if "train.optimizer" in e
                                               else "") for f, o, e in OBJECTIVE_RUNS])
def test_each_objective_trains_its_family(tmp_path, family, objective, extra):
  overrides = {**TINY, "objective": objective, "train.steps": 16, "train.learning_rate": 3e-3,
               "train.warmup_steps": 2, "train.ckpt_every": 1000, "model.dropout_rate": 0.0,
               "model.attention_dropout_rate": 0.0, **extra}
  config = load_config(family, "tiny", **overrides)
  train.train_and_evaluate(config, str(tmp_path / "w"))
  losses = _losses(tmp_path / "w")
  first = np.mean([losses[s] for s in sorted(losses)[:3]])
  last = np.mean([losses[s] for s in sorted(losses)[-3:]])
  assert last < first, losses


def test_init_from_a_workdir_fine_tunes_with_its_tokenizer_and_rejects_other_shapes(tmp_path):
  src = tmp_path / "src"  # one source run for both checks
  train.train_and_evaluate(load_config("gpt", "tiny", **TINY, **{"train.steps": 2}), str(src))
  config = load_config("gpt", "tiny", **TINY, **{"train.steps": 2, "model.embed_dim": 32,
                                                 "init_from": str(src)})
  with pytest.raises(config_schema.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / "mismatched"))
  assert "init_from" in str(e.value) and "shape" in str(e.value)
  config = load_config("gpt", "tiny", **TINY, **{
      "train.steps": 2, "objective": "classification", "model.num_classes": 2,
      "data.corpus": "sst2", "data.max_docs": 16, "init_from": str(src)})
  train.train_and_evaluate(config, str(tmp_path / "dst"))
  # sst2 alone would train a different vocabulary; the pretrained body needs the source's ids
  assert (tmp_path / "dst" / "tokenizer.json").read_text() == \
      (src / "tokenizer.json").read_text()


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_pair_objectives_fit_one_real_batch(objective):
  """NSP/SOP have no shortcut left to learn in 16 fresh batches (the pairs are length-balanced),
  so the pair loss must instead fall on one repeated batch of real wikitext pairs."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.model import models
  from gptjax.training import sharding
  from gptjax.data import tokenization
  from gptjax.training import train_step
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  config = load_config("bert", "tiny", **{"objective": objective, "data.corpus": "wikitext2",
                                          "data.sop": objective == "sop", "train.learning_rate": 3e-3,
                                          "train.warmup_steps": 2, "model.dropout_rate": 0.0,
                                          "model.attention_dropout_rate": 0.0})
  cfg = ModelConfig.from_config(config.model)
  tok = tokenization.load_or_train_tokenizer(config)
  batch = next(input_pipeline.make_train_iterator(config, tok))
  assert 0 < batch["pair_labels"].sum() < len(batch["pair_labels"])  # both labels present
  tx = train_step.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.parallelism)
  state, shardings = train_step.create_state(cfg, tx, 0, mesh, config.parallelism,
                                             config.data.seq_len, 0)
  step = train_step.make_mesh_train_step(models.make_model(cfg), objective, tx, 0, 1, mesh,
                                         shardings)
  losses = []
  with jax.set_mesh(mesh):
    device_batch = sharding.global_batch(batch, mesh)
    for _ in range(16):
      state, m = step(state, device_batch)
      losses.append(float(m["loss"]))
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("grad_scale", [1e-3, 30.0])  # below and above the clip norm
def test_gptjax_optimizer_matches_optax_clip_and_adamw(grad_scale):
  """make_optimizer's clip (one scalar factor) keeps optax's state tree and its updates."""
  import optax  # pylint: disable=g-import-not-at-top
  from gptjax.training import train_step  # pylint: disable=g-import-not-at-top
  cfg = load_config("gpt", "tiny").train
  params = {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
            "bias": jax.random.normal(jax.random.key(1), (32,))}
  reference = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(train_step.learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=train_step.decay_mask))
  ours = train_step.make_optimizer(cfg)
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(reference.init(params))
  results = []
  for tx in (ours, reference):
    p, s = params, tx.init(params)
    for i in range(3):
      g = jax.tree.map(lambda x: grad_scale * jax.random.normal(jax.random.key(10 + i), x.shape),
                       params)
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    results.append((p, s))
  tol = 0 if grad_scale < cfg.grad_clip else 1e-5  # unclipped: bit-identical
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 1e-3), *results)


def test_adafactor_matches_optax_without_decay_and_decays_by_lr_times_rate():
  """train.optimizer=adafactor is optax's Adafactor (T5 settings); weight decay is lr * rate * w."""
  import optax  # pylint: disable=g-import-not-at-top
  from gptjax.training import train_step  # pylint: disable=g-import-not-at-top
  cfg = load_config("t5", "tiny", **{"train.optimizer": "adafactor", "train.learning_rate": 1e-2,
                                     "train.weight_decay": 0.0, "train.grad_clip": 0.0}).train
  params = {"kernel": jax.random.normal(jax.random.key(0), (256, 192)),
            "scale": jax.random.normal(jax.random.key(1), (192,))}
  grads = [jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(10 + i), x.shape), params)
           for i in range(3)]
  def run(tx, gs):
    p, s = params, tx.init(params)
    for g in gs:
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    return p
  reference = optax.adafactor(train_step.learning_rate_schedule(cfg), decay_rate=0.8,
                              clipping_threshold=1.0, multiply_by_parameter_scale=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               run(train_step.make_optimizer(cfg), grads), run(reference, grads))
  cfg.weight_decay = 0.5
  zero = [jax.tree.map(np.zeros_like, params)] * 3  # no gradient: only the decay moves weights
  schedule = train_step.learning_rate_schedule(cfg)
  kept = np.prod([1 - float(schedule(t)) * 0.5 for t in range(3)])
  assert kept < 0.999
  decayed = run(train_step.make_optimizer(cfg), zero)
  np.testing.assert_allclose(decayed["kernel"], params["kernel"] * kept, rtol=1e-5)
  np.testing.assert_array_equal(decayed["scale"], params["scale"])  # vectors are not decayed
