"""The family adapters (gptjax/model/family.py) and LoRA as a parameter transform."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from gptjax.config_schema import ConfigError
from gptjax.data import batch_spec
from gptjax.model import family, models
from gptjax.model.config import ModelConfig
from gptjax.training import objectives
from gptjax.transfer import trainable

CONFIGS = {"gpt": family.DECODER_ONLY, "bert": family.ENCODER_ONLY, "t5": family.ENCODER_DECODER}


def test_unknown_family_is_one_line_naming_the_known_ones():
  with pytest.raises(ConfigError) as e:
    family.get("decoder_encoder")
  msg = str(e.value)
  assert "\n" not in msg and "decoder_encoder" in msg
  assert all(name in msg for name in family.names())
  with pytest.raises(ConfigError):
    batch_spec.check_family_objective("gpt2", "next_token")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_adapters_dummy_inputs_init_its_model(name):
  cfg = ModelConfig.from_config(load_config(name, "tiny").model)
  adapter = family.of(cfg)
  assert adapter.name == CONFIGS[name] and adapter is family.get(cfg.family)
  assert set(adapter.objectives) <= set(batch_spec.TOKEN_KEYS)
  model = adapter.make_model(cfg)
  inputs = adapter.dummy_inputs(cfg, 2, 8, 4)
  params = model.init(jax.random.key(0), **inputs)["params"]
  out = model.apply({"params": params}, **inputs)
  width = 4 if adapter.cross_attention else 8
  assert out["logits" if adapter.generates else "hidden"].shape[:2] == (2, width)
  h = adapter.hidden_states(model, nn.meta.unbox(params), inputs.get("inputs", inputs.get(
      "enc_inputs")), jnp.ones((2, 8), jnp.int32))
  assert h.shape == (2, 8, cfg.embed_dim)


def test_lora_objective_equals_the_loss_of_the_merged_params():
  config = load_config("gpt", "tiny", **{"finetune.trainable": "lora", "finetune.lora_rank": 2})
  cfg = ModelConfig.from_config(config.model)
  model = models.make_model(cfg)
  base = nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 1, 8))
  params = trainable.add_lora(config, base, jax.random.key(1))
  # B != 0, as after some training
  params["lora"] = jax.tree.map(lambda x: x + 0.05, params["lora"])
  ids = (jnp.arange(16).reshape(2, 8) * 7) % 60 + 3
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, 1), "weights": jnp.ones((2, 8)),
           "input_mask": jnp.ones((2, 8), jnp.int32)}
  terms_fn = trainable.lora_objective(config, "instruction")
  lora_terms = terms_fn(model, params, batch, None, True)
  merged = trainable.merged_params(config, params)
  plain = objectives.instruction(model, merged, batch, None, True)
  base_terms = objectives.instruction(model, base, batch, None, True)
  np.testing.assert_allclose(float(lora_terms["lm_loss"][0]), float(plain["lm_loss"][0]), rtol=1e-6)
  assert abs(float(plain["lm_loss"][0]) - float(base_terms["lm_loss"][0])) > 1e-4
  # gradients reach the adapters through the merge
  grads = jax.grad(lambda p: terms_fn(model, p, batch, None, True)["lm_loss"][0])(params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["lora"]))
  assert trainable.lora_objective(load_config("gpt", "tiny"), "instruction") == "instruction"
