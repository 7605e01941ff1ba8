"""experiments/torch_reference.py: the PyTorch GPT is gptjax's function, and the script's table."""

import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from conftest import REPO, load_config
from gptjax.model import models
from gptjax.model.config import ModelConfig

pytest.importorskip("torch")
from experiments import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_pytorch_gpt_with_gptjax_weights_gives_gptjax_logits(monkeypatch):
  cfg = ModelConfig.from_config(load_config("gpt", "tiny").model)
  params = jax.device_get(nn.meta.unbox(models.init_params(cfg, jax.random.key(3), 1, 16)))
  model = torch_reference.TorchGPT(cfg)
  assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))
  assert torch_reference.check_same_function(model, cfg, params, 16) < 1e-4
  # without the weight copy the check must fail, in one line
  fresh = torch_reference.TorchGPT(cfg)
  monkeypatch.setattr(torch_reference, "load_gptjax_params", lambda *_: None)
  with pytest.raises(SystemExit, match="logits differ"):
    torch_reference.check_same_function(fresh, cfg, params, 16)


def test_script_prints_the_comparison_row():
  result = subprocess.run([sys.executable, str(REPO / "experiments" / "torch_reference.py"),
                           "--variants=tiny", "--steps=1", "--rounds=1", "--warmup_steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = next(ln for ln in result.stdout.splitlines() if ln.startswith("| gpt:tiny |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x")
