"""Hugging Face `config.json` (GPT-2, BERT, T5, BART) as gptjax `config.model` fields.

Only the architecture is read here; the tensors are gptjax/transfer/hf_import.py.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from gptjax.config_schema import ConfigError
from gptjax.model.family import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY

def read_config(hf_dir: str) -> dict:
  """The parsed config.json of `hf_dir`; one-line ConfigError when there is none."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"hf:{hf_dir}: no config.json (expected a Hugging Face checkpoint folder)")
  with open(path) as f:
    return json.load(f)


def _activation(name: str, where: str) -> str:
  table = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
           "gelu": "gelu_exact", "relu": "relu"}
  if name not in table:
    raise ConfigError(f"{where}: activation {name!r} is not supported (gelu, gelu_new, relu)")
  return table[name]


def t5_head(hf_dir: str, c: dict) -> tuple[bool, bool]:
  """(tied, scaled) for T5: v1.0 ties and scales logits by d**-0.5, v1.1 neither.

  transformers>=5 writes `scale_decoder_outputs` and always ties; older versions
  wrote `tie_word_embeddings=false` and a separate `lm_head.weight`.
  """
  scale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True) is not False)
  tie = True
  st = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(st):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(st, framework="np") as f:
      keys = set(f.keys())
      if "lm_head.weight" in keys and "shared.weight" in keys:
        tie = bool(np.array_equal(f.get_tensor("lm_head.weight"), f.get_tensor("shared.weight")))
  return tie, scale


def model_overrides(hf_dir: str) -> dict:
  """The `config.model` field values that reproduce the checkpoint in `hf_dir`."""
  c = read_config(hf_dir)
  kind = c.get("model_type", "")
  where = f"hf:{hf_dir} (model_type={kind!r})"
  if kind == "gpt2":
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
      raise ConfigError(f"{where}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn unsupported")
    d = c["n_embd"]
    return dict(family=DECODER_ONLY, vocab_size=c["vocab_size"], embed_dim=d, num_heads=c["n_head"],
                mlp_dim=c.get("n_inner") or 4 * d, num_layers=c["n_layer"], max_len=c["n_positions"],
                position="learned", norm="layernorm", norm_position="pre", final_norm=True,
                embed_norm=False, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                activation=_activation(c.get("activation_function", "gelu_new"), where),
                use_bias=True, scale_attention=True, tie_embeddings=True, init_std=0.02)
  if kind == "bert":
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise ConfigError(f"{where}: position_embedding_type={c['position_embedding_type']!r} "
                        "unsupported; only 'absolute'")
    return dict(family=ENCODER_ONLY, vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
                num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
                num_layers=c["num_hidden_layers"], max_len=c["max_position_embeddings"],
                position="learned", norm="layernorm", norm_position="post", final_norm=False,
                embed_norm=True, norm_eps=c.get("layer_norm_eps", 1e-12),
                activation=_activation(c.get("hidden_act", "gelu"), where),
                type_vocab_size=c.get("type_vocab_size", 2), use_bias=True, scale_attention=True,
                tie_embeddings=True, init_std=0.02)
  if kind == "t5":
    proj = c.get("feed_forward_proj", "relu")
    acts = {"relu": "relu", "gated-gelu": "gated_gelu", "gated-silu": "swiglu"}
    if proj not in acts:
      raise ConfigError(f"{where}: feed_forward_proj={proj!r} unsupported ({', '.join(acts)})")
    tie, scale = t5_head(hf_dir, c)
    return dict(family=ENCODER_DECODER, vocab_size=c["vocab_size"], embed_dim=c["d_model"],
                num_heads=c["num_heads"], head_dim=c["d_kv"], mlp_dim=c["d_ff"],
                num_layers=c["num_layers"],
                num_decoder_layers=c.get("num_decoder_layers") or c["num_layers"], max_len=512,
                position="relative", relative_buckets=c.get("relative_attention_num_buckets", 32),
                relative_max_distance=c.get("relative_attention_max_distance", 128),
                norm="rmsnorm", norm_position="pre", final_norm=True, embed_norm=False,
                norm_eps=c.get("layer_norm_epsilon", 1e-6), activation=acts[proj], use_bias=False,
                scale_attention=False, tie_embeddings=tie, scale_tied_logits=tie and scale,
                init_std=1.0)
  if kind == "bart":
    if (c["encoder_attention_heads"] != c["decoder_attention_heads"]
        or c["encoder_ffn_dim"] != c["decoder_ffn_dim"]):
      raise ConfigError(f"{where}: encoder and decoder must share head count and ffn size")
    if c.get("normalize_before") or c.get("add_final_layer_norm"):
      raise ConfigError(f"{where}: pre-LN (mBART-style) BART is unsupported")
    d = c["d_model"]
    return dict(family=ENCODER_DECODER, vocab_size=c["vocab_size"], embed_dim=d,
                num_heads=c["encoder_attention_heads"], mlp_dim=c["encoder_ffn_dim"],
                num_layers=c["encoder_layers"], num_decoder_layers=c["decoder_layers"],
                max_len=c["max_position_embeddings"], position="learned", position_offset=2,
                norm="layernorm", norm_position="post", final_norm=False, embed_norm=True,
                norm_eps=1e-5, activation=_activation(c.get("activation_function", "gelu"), where),
                use_bias=True, scale_attention=True,
                tie_embeddings=c.get("tie_word_embeddings", True),
                embed_scale=math.sqrt(d) if c.get("scale_embedding") else 1.0, init_std=0.02)
  if kind == "llama":  # also SmolLM, TinyLlama: pre-RMSNorm, SwiGLU, rotate-half RoPE, GQA
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                           "num_hidden_layers", "vocab_size") if k not in c]
    if missing:
      raise ConfigError(f"{where}: config.json has no {missing[0]!r}")
    rope = c.get("rope_parameters") or {}  # transformers 5 keeps rope_theta in here
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default" or \
        c.get("attention_bias") or c.get("mlp_bias"):
      raise ConfigError(f"{where}: scaled rope, attention_bias and mlp_bias are unsupported")
    if c.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{where}: hidden_act={c['hidden_act']!r} unsupported; only 'silu'")
    d, h = c["hidden_size"], c["num_attention_heads"]
    return dict(family=DECODER_ONLY, vocab_size=c["vocab_size"], embed_dim=d, num_heads=h,
                num_kv_heads=c.get("num_key_value_heads") or h, head_dim=c.get("head_dim") or d // h,
                mlp_dim=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                max_len=c.get("max_position_embeddings", 2048), position="rope",
                rope_base=float(c.get("rope_theta") or rope.get("rope_theta", 10000.0)), norm="rmsnorm",
                norm_position="pre", final_norm=True, embed_norm=False,
                norm_eps=c.get("rms_norm_eps", 1e-6), activation="swiglu", use_bias=False,
                scale_attention=True, tie_embeddings=c.get("tie_word_embeddings", False),
                init_std=0.02)
  raise ConfigError(f"{where}: unsupported layout; supported model_type: gpt2, bert, t5, bart, "
                    "llama")
