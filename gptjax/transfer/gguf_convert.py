"""A llama.cpp GGUF file (Llama architecture) as a Hugging Face folder that `init_from=hf:DIR` reads.

  python -m gptjax.transfer.gguf_convert --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=DIR

Writes DIR/config.json (model_type llama), DIR/model.safetensors (float32, Hugging Face tensor
names and layout), DIR/tokenizer.json (byte-level BPE from the file's vocabulary and merges) and
DIR/gguf_source.json (the file's sha256 and tensor types). Quantized tensors are dequantized with
the `gguf` package (llama.cpp's own reader). llama.cpp stores q and k with each head's rotary
pairs interleaved; they are put back in the rotate-half order of Hugging Face and gptjax.
Nothing is executed from the file; an unsupported architecture or tokenizer is one line.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from gptjax.config_schema import ConfigError

# llama.cpp pre-tokenizer names whose split is GPT-2's byte-level regex, after single digits
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
_PLAIN_PRE = ("gpt2", "default")
_HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def unpermute_rotary(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation: per head, interleaved rotary pairs -> rotate-half halves."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return w_OxI.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


def permute_rotary(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k permutation (the inverse of `unpermute_rotary`), for tests."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return w_OxI.reshape(heads, 2, out // heads // 2, *rest).swapaxes(1, 2).reshape(w_OxI.shape)


def hf_config_from_gguf(reader) -> dict:
  """config.json contents of a Llama-architecture GGUF."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(f"gguf: general.architecture={arch!r} is unsupported; only 'llama'")
  get = lambda k, d=None: _field(reader, f"llama.{k}", d)
  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  rope_dims = int(get("rope.dimension_count", d // heads))
  if rope_dims != d // heads:
    raise ConfigError(f"gguf: llama.rope.dimension_count={rope_dims} is not the head dimension "
                      f"{d // heads}; partial rotary embeddings are unsupported")
  vocab = int(get("vocab_size", 0)) or len(reader.fields["tokenizer.ggml.tokens"].data)
  names = {t.name for t in reader.tensors}
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
          "hidden_size": d, "num_attention_heads": heads,
          "num_key_value_heads": int(get("attention.head_count_kv", heads)),
          "intermediate_size": int(get("feed_forward_length")),
          "num_hidden_layers": int(get("block_count")),
          "max_position_embeddings": int(get("context_length", 2048)),
          "rope_theta": float(get("rope.freq_base", 10000.0)),
          "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
          "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in names,
          "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
          "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}


def hf_tensors_from_gguf(reader, config: dict) -> dict[str, np.ndarray]:
  """Float32 tensors under Hugging Face Llama names, dequantized and with q/k un-permuted."""
  from gguf import quants  # pylint: disable=g-import-not-at-top
  out = {}
  for t in reader.tensors:
    w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGML lists the fastest axis first
    if t.name == "token_embd.weight":
      out["model.embed_tokens.weight"] = w
    elif t.name == "output_norm.weight":
      out["model.norm.weight"] = w
    elif t.name == "output.weight":
      out["lm_head.weight"] = w
    elif t.name.startswith("blk."):
      _, layer, kind, _ = t.name.split(".")
      if kind not in _HF_NAMES:
        raise ConfigError(f"gguf: tensor {t.name!r} is not part of a Llama block")
      if kind == "attn_q":
        w = unpermute_rotary(w, config["num_attention_heads"])
      elif kind == "attn_k":
        w = unpermute_rotary(w, config["num_key_value_heads"])
      out[f"model.layers.{layer}.{_HF_NAMES[kind]}.weight"] = w
    elif t.name != "rope_freqs.weight":
      raise ConfigError(f"gguf: tensor {t.name!r} is not part of a Llama model")
  return out


def tokenizer_from_gguf(reader):
  """A `tokenizers.Tokenizer`: byte-level BPE with the file's vocabulary, merges and specials."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
  if kind != "gpt2" or pre not in _DIGIT_SPLIT_PRE + _PLAIN_PRE:
    raise ConfigError(f"gguf: tokenizer.ggml.model={kind!r} pre={pre!r} is unsupported; only "
                      f"byte-level BPE ('gpt2') with pre in {', '.join(_DIGIT_SPLIT_PRE + _PLAIN_PRE)}")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               byte_level]) if pre in _DIGIT_SPLIT_PRE else byte_level
  tok.decoder = decoders.ByteLevel()
  control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp's CONTROL tokens
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in control])
  return tok


def convert(gguf_path: str, out_dir: str) -> dict:
  """Writes the Hugging Face folder for `gguf_path` into `out_dir`; returns its config.json."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("reading GGUF needs the gguf package: pip install gguf") from None
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(gguf_path):
    raise ConfigError(f"--gguf={gguf_path}: no such file")
  reader = gguf.GGUFReader(gguf_path)
  config = hf_config_from_gguf(reader)
  tensors = hf_tensors_from_gguf(reader, config)
  tokenizer = tokenizer_from_gguf(reader)
  digest = hashlib.sha256()
  with open(gguf_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  types = sorted({t.tensor_type.name for t in reader.tensors})
  with open(os.path.join(out_dir, "gguf_source.json"), "w") as f:
    json.dump({"file": os.path.basename(gguf_path), "sha256": digest.hexdigest(),
               "name": _field(reader, "general.name"), "tensor_types": types}, f, indent=2)
  return config


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    config = convert(flags.FLAGS.gguf, flags.FLAGS.out)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {flags.FLAGS.out}: {config['num_hidden_layers']} layers, d={config['hidden_size']}, "
        f"vocab {config['vocab_size']}; use init_from=hf:{flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("gguf", None, "A llama.cpp .gguf file (Llama architecture).", required=True)
  flags.DEFINE_string("out", None, "Output folder for config.json, model.safetensors, "
                      "tokenizer.json.", required=True)
  app.run(main)
