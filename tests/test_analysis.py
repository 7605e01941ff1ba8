"""gptjax/analysis/checkpoint_analysis.py on tiny GPT checkpoints: norms, diffs, CKA, attention maps, eval, bad input."""

import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import REPO, load_config
from gptjax.analysis import checkpoint_analysis as analysis
from gptjax.analysis import param_summary as summary
from gptjax.training import train
from gptjax.config_schema import ConfigError

TINY = {"train.progress": False, "train.eval_every": 0, "train.log_every": 1, "data.max_docs": 50}


@pytest.fixture(scope="session", name="ckpts")
def _ckpts(tmp_path_factory, data_cache):
  """Three tiny GPT workdirs trained once: a (seed 0), b (seed 1), c (one layer fewer)."""
  del data_cache
  root = tmp_path_factory.mktemp("analysis_ckpts")
  runs = {"a": dict(TINY, **{"train.steps": 4}),
          "b": dict(TINY, **{"train.steps": 4, "seed": 1}),
          "c": dict(TINY, **{"train.steps": 1, "model.num_layers": 1})}
  for name, overrides in runs.items():
    train.train_and_evaluate(load_config("gpt", "tiny", **overrides), str(root / name))
  return {name: str(root / name) for name in runs}


def test_identical_checkpoints_tables_cka_attention_eval(ckpts, tmp_path):
  out = analysis.analyze(ckpts["a"], ckpts["a"], "ROMEO: wherefore art thou Romeo?",
                         str(tmp_path / "out"), max_batches=1)
  # parameter table: every parameter once, norms per layer
  ckpt = analysis.load(ckpts["a"])
  assert sum(r["size"] for r in out["params"]) == summary.count_params(ckpt.params)
  layers = {r["layer"]: r for r in out["layers"]}
  assert {"token_embed", "decoder/pos_embed", "decoder/layers_0", "decoder/layers_1",
          "decoder/final_norm"} <= set(layers)
  norms = [r["norm"] for r in out["params"] if r["layer"] == "decoder/layers_1"]
  assert layers["decoder/layers_1"]["norm"] == pytest.approx(np.sqrt(np.sum(np.square(norms))))
  # a checkpoint against itself: no change, cosine 1
  for row in out["diff_layers"] + out["diff_params"]:
    assert row["rel_change"] == 0.0 and row["cosine"] == pytest.approx(1.0, abs=1e-12)
  # CKA with itself is 1 on every layer; hidden states are of real tokens only
  assert [r["layer"] for r in out["cka"]] == ["decoder/embed", "decoder/layers_0",
                                              "decoder/layers_1"]
  for row in out["cka"]:
    assert row["cka"] == pytest.approx(1.0, abs=1e-9) and row["tokens"] > 0
  # attention: rows are distributions, causal, and reproduce the model's own attention output
  assert out["attention_error"] < 1e-5
  for probs_HxLxS in out["attention"].values():
    np.testing.assert_allclose(probs_HxLxS.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(probs_HxLxS, k=1) < 1e-6)
  for png in out["attention_pngs"] + [out["cka_png"]]:
    image = plt.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  # eval loss and perplexity, the same for the same checkpoint
  a_eval, a_again = out["eval"]
  assert a_eval["lm_perplexity"] == pytest.approx(np.exp(a_eval["lm_loss"]), rel=1e-5)
  assert a_eval["loss"] == a_again["loss"] > 0
  for name in ("params.csv", "layers.csv", "diff_params.csv", "diff_layers.csv", "cka.csv",
               "cka_matrix.csv", "eval.csv", "cka.png", "attention_decoder_self_attn.png"):
    assert os.path.getsize(tmp_path / "out" / name) > 0, name


def test_linear_cka_properties():
  rng = np.random.default_rng(0)
  x_NxD = rng.normal(size=(200, 16))
  q_DxD, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  assert analysis.linear_cka(x_NxD, x_NxD) == pytest.approx(1.0)
  assert analysis.linear_cka(x_NxD, 3.0 * x_NxD @ q_DxD + 1.0) == pytest.approx(1.0)
  assert analysis.linear_cka(x_NxD, rng.normal(size=(200, 8))) < 0.3


def test_cli_two_checkpoints(ckpts, tmp_path):
  cmd = [sys.executable, str(REPO / "run.py"), "--config=configs/gpt.py:tiny", "--mode=analyze",
         f"--workdir={ckpts['a']}", f"--other_workdir={ckpts['b']}", f"--output={tmp_path}",
         "--config.train.eval_steps=1", "--sentence=To be or not to be"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "== difference" in result.stdout and "rel_change" in result.stdout
  import csv  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "diff_layers.csv") as f:
    rows = {r["layer"]: r for r in csv.DictReader(f)}
  # different seeds: every layer moved, and the random matrices are far from aligned
  assert all(float(r["rel_change"]) > 0 for r in rows.values())
  assert float(rows["token_embed"]["cosine"]) < 0.5
  with open(tmp_path / "cka.csv") as f:
    ckas = [float(r["cka"]) for r in csv.DictReader(f)]
  assert all(0.0 < c < 1.0 for c in ckas)
  with open(tmp_path / "eval.csv") as f:
    assert len(list(csv.DictReader(f))) == 2


def test_different_architectures_is_one_clear_error(ckpts, tmp_path):
  with pytest.raises(ConfigError, match=r"different architectures .*num_layers: 2 vs 1") as e:
    analysis.analyze(ckpts["a"], ckpts["c"], output=str(tmp_path))
  assert "\n" not in str(e.value)
  a, c = analysis.load(ckpts["a"]), analysis.load(ckpts["c"])
  with pytest.raises(ConfigError, match="different architectures"):
    analysis.diff_tables(a.params, c.params)


def test_scanned_params_unstack_per_layer():
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(num_layers=3, scan_layers=True)
  scanned = nn.meta.unbox(models.init_params(cfg, jax.random.key(0)))
  flat = analysis.unstack_layers(jax.device_get(scanned))
  assert {"layers_0", "layers_1", "layers_2"} <= set(flat["decoder"])
  np.testing.assert_array_equal(flat["decoder"]["layers_2"]["mlp"]["wo"]["kernel"],
                                scanned["decoder"]["layers"]["mlp"]["wo"]["kernel"][2])
