"""Hugging Face checkpoints (GPT-2, BERT, T5, BART, Llama layouts) as gptjax configs and param trees.

`init_from="hf:DIR"` names a folder with `config.json` and `model.safetensors`.
Nothing is downloaded and nothing is unpickled: a `pytorch_model.bin` is refused.
Every problem (unsupported layout, missing tensor, shape mismatch) is one
`ConfigError` line that names the field or tensor.

Conversions: HF `nn.Linear` weights are [out, in] and are transposed; GPT-2's
`Conv1D` weights are already [in, out]. Attention kernels are reshaped to
gptjax's [D, H, Dh] (q/k/v) and [H, Dh, D] (out).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Callable, Optional

import numpy as np

from gptjax.config_schema import ConfigError
from gptjax.transfer import hf_config
# model_overrides is read as hf_import.model_overrides by callers
from gptjax.transfer.hf_config import model_overrides  # noqa: F401
from gptjax.model.config import ModelConfig

HEAD_PARAMS = ("pooler", "nsp_head", "classifier", "mlm_transform", "mlm_norm", "mlm_bias", "lm_head")
_PREFIXES = ("", "bert.", "transformer.", "model.", "roberta.")
# Fields that change the computation without changing any shape: must agree with the target.
_ARCH_FIELDS = ("family", "num_layers", "num_decoder_layers", "position", "position_offset",
                "norm", "norm_position", "final_norm", "embed_norm", "activation", "use_bias",
                "scale_attention", "tie_embeddings", "scale_tied_logits", "embed_scale",
                "relative_max_distance")


# ------------------------------------------------------------------ tensors
class _Tensors:
  """The checkpoint's tensors by name, tolerant of the task-model prefixes (bert., model., ...)."""

  def __init__(self, hf_dir: str):
    st = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(st):
      if any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("pytorch_model.bin", "model.bin")):
        raise ConfigError(f"hf:{hf_dir}: only pytorch_model.bin found; pickled checkpoints are "
                          "never loaded, convert it to model.safetensors first")
      raise ConfigError(f"hf:{hf_dir}: no model.safetensors")
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    self.dir = hf_dir
    self.raw = load_file(st)

  def find(self, name: str) -> Optional[str]:
    for p in _PREFIXES:
      if p + name in self.raw:
        return p + name
    return None

  def has(self, name: str) -> bool:
    return self.find(name) is not None

  def get(self, *names: str) -> np.ndarray:
    for name in names:
      key = self.find(name)
      if key is not None:
        return np.asarray(self.raw[key], np.float32)
    raise ConfigError(f"hf:{self.dir}: tensor {names[0]!r} is missing from model.safetensors")


def _lin(w_OxI: np.ndarray) -> np.ndarray:
  return w_OxI.T


def _norm(t: _Tensors, name: str, scale: str = "weight", bias: Optional[str] = "bias") -> dict:
  out = {"scale": t.get(f"{name}.{scale}", f"{name}.gamma")}
  if bias:
    out["bias"] = t.get(f"{name}.{bias}", f"{name}.beta")
  return out


def _qkv_from_linear(t: _Tensors, names: dict, h: int, dh: int, bias: bool) -> dict:
  """q/k/v/out from four nn.Linear layers; names maps query|key|value|out to HF prefixes."""
  out = {}
  for ours, theirs in names.items():
    w_OxI = t.get(f"{theirs}.weight")
    if ours == "out":
      p = {"kernel": _lin(w_OxI).reshape(h, dh, -1)}
      if bias:
        p["bias"] = t.get(f"{theirs}.bias")
    else:
      p = {"kernel": _lin(w_OxI).reshape(-1, h, dh)}
      if bias:
        p["bias"] = t.get(f"{theirs}.bias").reshape(h, dh)
    out[ours] = p
  return out


def _dense(t: _Tensors, name: str, bias: bool = True) -> dict:
  p = {"kernel": _lin(t.get(f"{name}.weight"))}
  if bias:
    p["bias"] = t.get(f"{name}.bias")
  return p


def _gpt2(t: _Tensors, cfg: ModelConfig) -> dict:
  h, dh, d = cfg.num_heads, cfg.dims_per_head, cfg.embed_dim
  dec = {"pos_embed": {"embedding": t.get("wpe.weight")}, "final_norm": _norm(t, "ln_f")}
  for i in range(cfg.num_layers):
    b = f"h.{i}"
    w_Dx3D, b_3D = t.get(f"{b}.attn.c_attn.weight"), t.get(f"{b}.attn.c_attn.bias")
    attn = {n: {"kernel": w.reshape(d, h, dh), "bias": bb.reshape(h, dh)} for n, w, bb in zip(
        ("query", "key", "value"), np.split(w_Dx3D, 3, axis=1), np.split(b_3D, 3))}
    attn["out"] = {"kernel": t.get(f"{b}.attn.c_proj.weight").reshape(h, dh, d),
                   "bias": t.get(f"{b}.attn.c_proj.bias")}
    dec[f"layers_{i}"] = {
        "self_attn_norm": _norm(t, f"{b}.ln_1"), "self_attn": attn, "mlp_norm": _norm(t, f"{b}.ln_2"),
        "mlp": {"wi": {"kernel": t.get(f"{b}.mlp.c_fc.weight"), "bias": t.get(f"{b}.mlp.c_fc.bias")},
                "wo": {"kernel": t.get(f"{b}.mlp.c_proj.weight"),
                       "bias": t.get(f"{b}.mlp.c_proj.bias")}}}
  return {"token_embed": {"embedding": t.get("wte.weight")}, "decoder": dec}


def _bert(t: _Tensors, cfg: ModelConfig) -> dict:
  h, dh = cfg.num_heads, cfg.dims_per_head
  enc = {"pos_embed": {"embedding": t.get("embeddings.position_embeddings.weight")},
         "embed_norm": _norm(t, "embeddings.LayerNorm")}
  for i in range(cfg.num_layers):
    b = f"encoder.layer.{i}"
    enc[f"layers_{i}"] = {
        "self_attn": _qkv_from_linear(t, {"query": f"{b}.attention.self.query",
                                          "key": f"{b}.attention.self.key",
                                          "value": f"{b}.attention.self.value",
                                          "out": f"{b}.attention.output.dense"}, h, dh, True),
        "self_attn_norm": _norm(t, f"{b}.attention.output.LayerNorm"),
        "mlp": {"wi": _dense(t, f"{b}.intermediate.dense"), "wo": _dense(t, f"{b}.output.dense")},
        "mlp_norm": _norm(t, f"{b}.output.LayerNorm")}
  p = {"token_embed": {"embedding": t.get("embeddings.word_embeddings.weight")}, "encoder": enc,
       "type_embed": {"embedding": t.get("embeddings.token_type_embeddings.weight")}}
  if t.has("pooler.dense.weight"):
    p["pooler"] = _dense(t, "pooler.dense")
  if t.has("cls.predictions.transform.dense.weight"):
    p["mlm_transform"] = _dense(t, "cls.predictions.transform.dense")
    p["mlm_norm"] = _norm(t, "cls.predictions.transform.LayerNorm")
    p["mlm_bias"] = t.get("cls.predictions.bias")
  if t.has("cls.seq_relationship.weight"):
    p["nsp_head"] = _dense(t, "cls.seq_relationship")
  if t.has("classifier.weight"):
    p["classifier"] = _dense(t, "classifier")
  return p


def _t5(t: _Tensors, cfg: ModelConfig) -> dict:
  h, dh = cfg.num_heads, cfg.dims_per_head
  gated = cfg.activation in ("gated_gelu", "swiglu")

  def stack(side: str, n: int, cross: bool) -> dict:
    s = {"rel_bias": {"rel_embedding": t.get(
        f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
         "final_norm": {"scale": t.get(f"{side}.final_layer_norm.weight")}}
    for i in range(n):
      b = f"{side}.block.{i}.layer"
      attn = lambda m: {k: {"kernel": v["kernel"]} for k, v in _qkv_from_linear(
          t, {"query": f"{m}.q", "key": f"{m}.k", "value": f"{m}.v", "out": f"{m}.o"}, h, dh,
          False).items()}
      lay = {"self_attn_norm": {"scale": t.get(f"{b}.0.layer_norm.weight")},
             "self_attn": attn(f"{b}.0.SelfAttention")}
      ff = f"{b}.{2 if cross else 1}"
      if cross:
        lay["cross_attn_norm"] = {"scale": t.get(f"{b}.1.layer_norm.weight")}
        lay["cross_attn"] = attn(f"{b}.1.EncDecAttention")
      lay["mlp_norm"] = {"scale": t.get(f"{ff}.layer_norm.weight")}
      names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
      lay["mlp"] = {n_: _dense(t, f"{ff}.DenseReluDense.{n_}", bias=False) for n_ in names}
      s[f"layers_{i}"] = lay
    return s

  p = {"token_embed": {"embedding": t.get("shared.weight", "encoder.embed_tokens.weight")},
       "encoder": stack("encoder", cfg.num_layers, False),
       "decoder": stack("decoder", cfg.decoder_layers, True)}
  if not cfg.tie_embeddings:
    p["lm_head"] = _dense(t, "lm_head", bias=False)
    if hf_config.t5_head(t.dir, hf_config.read_config(t.dir))[1]:  # untied yet scaled: fold d**-0.5 into the head
      p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * np.float32(cfg.embed_dim ** -0.5)
  return p


def _bart(t: _Tensors, cfg: ModelConfig) -> dict:
  h, dh = cfg.num_heads, cfg.dims_per_head
  bias = t.find("final_logits_bias")
  if bias is not None and np.any(t.raw[bias] != 0):
    raise ConfigError(f"hf:{t.dir}: a nonzero final_logits_bias is unsupported by gptjax's BART")

  def stack(side: str, n: int, cross: bool) -> dict:
    s = {"pos_embed": {"embedding": t.get(f"{side}.embed_positions.weight")},
         "embed_norm": _norm(t, f"{side}.layernorm_embedding")}
    for i in range(n):
      b = f"{side}.layers.{i}"
      attn = lambda m: _qkv_from_linear(t, {"query": f"{m}.q_proj", "key": f"{m}.k_proj",
                                            "value": f"{m}.v_proj", "out": f"{m}.out_proj"},
                                        h, dh, True)
      lay = {"self_attn": attn(f"{b}.self_attn"), "self_attn_norm": _norm(t, f"{b}.self_attn_layer_norm"),
             "mlp": {"wi": _dense(t, f"{b}.fc1"), "wo": _dense(t, f"{b}.fc2")},
             "mlp_norm": _norm(t, f"{b}.final_layer_norm")}
      if cross:
        lay["cross_attn"] = attn(f"{b}.encoder_attn")
        lay["cross_attn_norm"] = _norm(t, f"{b}.encoder_attn_layer_norm")
      s[f"layers_{i}"] = lay
    return s

  p = {"token_embed": {"embedding": t.get("shared.weight", "encoder.embed_tokens.weight")},
       "encoder": stack("encoder", cfg.num_layers, False),
       "decoder": stack("decoder", cfg.decoder_layers, True)}
  if not cfg.tie_embeddings:
    p["lm_head"] = _dense(t, "lm_head", bias=False)
  return p


def _llama(t: _Tensors, cfg: ModelConfig) -> dict:
  h, kh, dh = cfg.num_heads, cfg.kv_heads, cfg.dims_per_head
  dec = {"final_norm": {"scale": t.get("norm.weight")}}
  for i in range(cfg.num_layers):
    b = f"layers.{i}"
    attn = {ours: {"kernel": _lin(t.get(f"{b}.self_attn.{theirs}.weight")).reshape(-1, heads, dh)}
            for ours, theirs, heads in (("query", "q_proj", h), ("key", "k_proj", kh),
                                        ("value", "v_proj", kh))}
    attn["out"] = {"kernel": _lin(t.get(f"{b}.self_attn.o_proj.weight")).reshape(h, dh, -1)}
    dec[f"layers_{i}"] = {
        "self_attn_norm": {"scale": t.get(f"{b}.input_layernorm.weight")}, "self_attn": attn,
        "mlp_norm": {"scale": t.get(f"{b}.post_attention_layernorm.weight")},
        "mlp": {"wi_0": _dense(t, f"{b}.mlp.gate_proj", False),
                "wi_1": _dense(t, f"{b}.mlp.up_proj", False),
                "wo": _dense(t, f"{b}.mlp.down_proj", False)}}
  params = {"token_embed": {"embedding": t.get("embed_tokens.weight")}, "decoder": dec}
  if not cfg.tie_embeddings:
    params["lm_head"] = _dense(t, "lm_head", False)
  return params


_LAYOUTS: dict[str, Callable[[_Tensors, ModelConfig], dict]] = {
    "gpt2": _gpt2, "bert": _bert, "t5": _t5, "bart": _bart, "llama": _llama}


def load_hf(hf_dir: str, base: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict]:
  """(ModelConfig, unboxed float32 param tree) of the HF checkpoint folder `hf_dir`.

  `base` supplies the non-architecture fields (dtype, dropout, heads, ...); the
  architecture comes from config.json. Head flags follow the tensors present.
  """
  hf_dir = os.path.expanduser(hf_dir)
  overrides = hf_config.model_overrides(hf_dir)
  kind = hf_config.read_config(hf_dir)["model_type"]
  cfg = dataclasses.replace(base or ModelConfig(), **overrides)
  tensors = _Tensors(hf_dir)
  params = _LAYOUTS[kind](tensors, cfg)
  if kind == "bert":  # which heads the checkpoint carries
    cfg = dataclasses.replace(cfg, mlm_head="mlm_transform" in params, nsp_head="nsp_head" in params,
                              num_classes=params["classifier"]["kernel"].shape[1]
                              if "classifier" in params else 0)
  return cfg, params


# -------------------------------------------------------------- init_from
def _fresh(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """A new head parameter: normal(0.02) kernels/embeddings, ones for norm scales, zeros otherwise."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "scale":
    return np.ones(shape, np.float32)
  if leaf in ("kernel", "embedding"):
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return np.zeros(shape, np.float32)


def load_init_params(init_from: str, cfg: ModelConfig, target_params_shapes) -> dict:
  """Params for `cfg` from `init_from="hf:DIR"`, checked against the target tree's shapes.

  `target_params_shapes` is the model's param tree (arrays, boxed or not, or
  jax.ShapeDtypeStruct). Head parameters the checkpoint lacks (a new classifier,
  pooler, ...) keep the target's values, or are freshly initialised when only
  shapes are given. A learned position table longer than config.model.max_len
  (plus offset) is cut to its first rows. Raises ConfigError (one line) on an unsupported layout, an
  architecture that disagrees with `cfg`, a missing tensor or a shape mismatch.
  """
  if not init_from.startswith("hf:"):
    raise ConfigError(f"init_from={init_from!r}: hf_import only reads 'hf:DIR'")
  hf_dir = init_from[3:]
  hf_cfg, params = load_hf(hf_dir, cfg)
  for field in _ARCH_FIELDS:
    ours, theirs = getattr(cfg, field), getattr(hf_cfg, field)
    if field == "num_decoder_layers":
      ours, theirs = cfg.decoder_layers, hf_cfg.decoder_layers
    if ours != theirs:
      raise ConfigError(f"init_from={init_from}: config.model.{field}={ours!r} but the checkpoint "
                        f"has {theirs!r}; use gptjax.transfer.hf_import.model_overrides({hf_dir!r})")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  target = traverse_util.flatten_dict(nn.meta.unbox(target_params_shapes), sep="/")
  loaded = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for path, ref in target.items():
    shape = tuple(ref.shape)
    if path not in loaded:
      if path.split("/", 1)[0] in HEAD_PARAMS:
        out[path] = np.asarray(ref) if hasattr(ref, "__array__") else _fresh(path, shape)
        continue
      raise ConfigError(f"init_from={init_from}: the checkpoint has no tensor for param {path!r}")
    value = loaded[path]
    if path.endswith("pos_embed/embedding") and value.shape[1:] == shape[1:] and \
        value.shape[0] > shape[0]:  # a shorter config.model.max_len keeps the first rows
      loaded[path] = value[:shape[0]]
    if tuple(loaded[path].shape) != shape:
      raise ConfigError(f"init_from={init_from}: shape mismatch for {path!r}: checkpoint "
                        f"{tuple(loaded[path].shape)} vs config {shape}")
    out[path] = loaded[path]
  return traverse_util.unflatten_dict(out, sep="/")
