"""The one schema every gptjax config follows, and its start-up validation.

`configs/*.py` start from `base_config()` and change fields; they never add new
ones. Because the returned ConfigDict is locked, a command-line override of an
unknown field (`--config.model.nmu_layers=4`) or of a wrong type fails at once
and names the field.
"""

from __future__ import annotations

import math
import os

import ml_collections

from gptjax.config_error import ConfigError  # pylint: disable=unused-import (re-exported)
from gptjax.data import batch_spec

FAMILIES = ("encoder_only", "decoder_only", "encoder_decoder")
POSITIONS = ("learned", "sinusoidal", "relative", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "gated_gelu", "swiglu")
ATTENTION_IMPLS = ("einsum", "dot_product")
# config.model.kernels: which implementation of the layers' ops runs (gptjax/model/ops.py)
KERNELS = ("auto", "xla", "xla_cpu")
# config.model.kernel_exclude: the xla_cpu tricks that can be turned off one by one (for A/B
# measurements, experiments/throughput.py --ab); what each does: the docstring of the ops that
# gptjax/model/ops.py's registry returns for xla_cpu, which read exactly these names
# (tests/test_xla_cpu_tricks.py)
XLA_CPU_TRICKS = ("flat_dense", "residual_grad_barrier", "attend_transposed", "softmax_vjp",
                  "bias_grad_matvec", "causal_blocks", "clip_as_scale", "cpu_head_matmul",
                  "cpu_fused_attention", "cpu_norm", "cpu_bias_gelu", "cpu_cross_entropy",
                  "cpu_weight_matmul", "cpu_decode_matmul")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
QUANTIZE_KINDS = ("", "int8")


def cache_dir() -> str:
  """gptjax's one cache folder (data, tokenizers, token arrays, kernels): $GPTJAX_CACHE.

  The kernel cache's old name, $GPTJAX_CACHE_DIR, is still read when $GPTJAX_CACHE is unset.
  """
  path = os.environ.get("GPTJAX_CACHE") or os.environ.get("GPTJAX_CACHE_DIR") or "~/.cache/gptjax"
  return os.path.expanduser(path)


# Fields added since older checkpoints were saved, with the value those runs used: a config read
# back from such a checkpoint gets them, and resuming one compares against them.
ADDED_FIELDS = {"train.optimizer": "adamw", "data.train_docs": 0}


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (read from an older checkpoint) with every ADDED_FIELDS entry it lacks."""
  for field, value in ADDED_FIELDS.items():
    section, name = field.rsplit(".", 1)
    if section in config and name not in config[section]:
      config[section][name] = value
  return config


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default config: every field a gptjax run can have."""
  c = ml_collections.ConfigDict()
  c.name = "gpt"
  c.variant = ""
  c.seed = 0
  c.objective = "next_token"
  c.init_from = ""  # "" | gptjax workdir | "hf:DIR"
  c.quantize = ""  # "" | "int8"

  # ------------------------------------------------------------------ model
  m = c.model = ml_collections.ConfigDict()
  m.family = "decoder_only"
  m.vocab_size = 8192
  m.embed_dim = 256
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: same as num_heads; fewer gives grouped-query attention
  m.head_dim = 0  # 0: embed_dim // num_heads
  m.mlp_dim = 1024
  m.num_layers = 4  # decoder-only: decoder layers; otherwise encoder layers
  m.num_decoder_layers = 0  # encoder-decoder only; 0: same as num_layers
  m.max_len = 256  # size of the learned position table / rope cache
  m.position = "learned"
  m.position_offset = 0  # BART keeps 2 unused rows at the start of its table
  m.relative_buckets = 32
  m.relative_max_distance = 128
  m.rope_base = 10000.0
  m.norm = "layernorm"
  m.norm_position = "pre"
  m.norm_eps = 1e-5
  m.final_norm = True  # a norm after the last layer (pre-LN models)
  m.embed_norm = False  # a norm on the embeddings (BERT, BART)
  m.activation = "gelu"
  m.use_bias = True
  m.scale_attention = True  # False: T5, which folds 1/sqrt(d) into the init
  m.tie_embeddings = True
  m.scale_tied_logits = False  # T5 v1.0: logits of a tied head times d**-0.5
  m.embed_scale = 1.0  # multiply token embeddings (e.g. sqrt(d) in some models)
  m.type_vocab_size = 0  # BERT token-type (segment A/B) embeddings
  m.dropout_rate = 0.0
  m.attention_dropout_rate = 0.0
  m.dtype = "float32"  # compute dtype; parameters stay float32
  m.attention_impl = "einsum"
  # auto: xla_cpu on a CPU backend when its C++ kernels build, else xla (plain JAX)
  m.kernels = "auto"
  # comma-separated XLA_CPU_TRICKS turned off under xla_cpu; the float32 few-row weight kernel is
  # off by default (no gain measured over XLA's dot; int8 weights always use it)
  m.kernel_exclude = "cpu_weight_matmul"
  m.scan_layers = False
  m.remat = "none"  # none, full, dots, dots_no_batch; saves no memory on XLA:CPU (PERFORMANCE.md)
  m.init_std = 0.02
  # heads
  m.mlm_head = False
  m.nsp_head = False
  m.num_classes = 0  # sequence-classification head when > 0
  m.pooling = "first"  # first | mean | last

  # ------------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "tiny_shakespeare"
  d.raw_dir = os.environ.get("GPTJAX_RAW_DIR", "")  # "" -> ../shared/data
  d.tfds_data_dir = ""  # where TFDS builds/reads array_record files
  d.text_files = ""  # glob of the user's own .txt/.jsonl for corpus=text_files
  d.seq_len = 128
  d.target_len = 0  # encoder-decoder targets; 0: seq_len (read it through target_len(config))
  d.batch_size = 16  # global batch, split over all devices and hosts
  d.eval_batch_size = 16
  d.mlm_probability = 0.15
  d.whole_word_mask = False
  d.noise_density = 0.15
  d.mean_span_length = 3.0
  d.poisson_lambda = 3.0
  d.permute_sentences = False
  d.sop = False
  d.seed = 0
  d.max_docs = 0  # 0: all; else only the first max_docs documents of every split (tests, smoke runs)
  d.train_docs = 0  # 0: all; else only the first train_docs documents of the train split (label budgets)
  t = d.tokenizer = ml_collections.ConfigDict()
  t.kind = "bpe"  # bpe | wordpiece | wordpiece_cased | unigram
  t.vocab_size = 8192
  t.path = ""  # an existing tokenizer.json / vocab.txt
  t.num_sentinels = 100

  # ------------------------------------------------------------------ train
  tr = c.train = ml_collections.ConfigDict()
  tr.steps = 1000
  tr.learning_rate = 1e-3
  tr.warmup_steps = 100
  tr.schedule = "cosine"  # cosine | linear | constant
  tr.decay_steps = 0  # horizon of the decay; 0: train.steps (fix it to extend a run exactly)
  tr.min_lr_ratio = 0.1
  tr.optimizer = "adamw"  # adamw | adafactor (T5's; learning_rate is then relative, e.g. 1e-2)
  tr.weight_decay = 0.1
  tr.b1 = 0.9
  tr.b2 = 0.95
  tr.grad_clip = 1.0
  tr.grad_accum = 1
  tr.log_every = 10
  tr.eval_every = 200
  tr.eval_steps = 10
  tr.ckpt_every = 200
  tr.keep = 3
  tr.best_metric = "eval_loss"
  tr.progress = True

  # ------------------------------------------------------------ parallelism
  p = c.parallelism = ml_collections.ConfigDict()
  p.mode = "mesh"  # mesh | pmap
  p.data = -1  # -1: whatever is left of the devices
  p.fsdp = 1
  p.tensor = 1
  p.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("layers", None),
  )
  p.coordinator_address = ""
  p.num_processes = 0
  p.process_id = -1

  # --------------------------------------------------------------- generate
  g = c.generate = ml_collections.ConfigDict()
  g.max_new_tokens = 64
  g.temperature = 1.0
  g.top_k = 0
  g.top_p = 1.0
  g.num_beams = 1
  g.length_penalty = 1.0
  g.repetition_penalty = 1.0
  g.stop = ""  # stop sequences separated by "|"
  g.seed = 0
  g.prompt_buckets = ""  # prompt widths sharing a compiled loop, e.g. "32,128,512"; "": 8, 16, ..
  # In-Context RALM (gptjax/inference/retrieval.py): prepend passages from this index to each prompt
  g.retrieval_index = ""
  g.retrieval_k = 2
  g.retrieval_query_tokens = 32  # the query: the prompt's last tokens

  # --------------------------------------------------------------- finetune
  f = c.finetune = ml_collections.ConfigDict()
  f.trainable = "all"  # head | last_block | all | lora
  f.lora_rank = 8
  f.lora_alpha = 16.0
  f.lora_dropout = 0.0
  f.lora_targets = "attention"  # attention | all
  f.prompt_template = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
  # objective=instruction: JSONL of {instruction, input, output}; without an eval file every
  # 20th record is held out for eval.
  f.instruction_data = ""
  f.instruction_eval_data = ""
  # objective=dpo: JSONL of {prompt, chosen, rejected}; without an eval file every 20th record is
  # held out for eval.
  f.preference_data = ""
  f.preference_eval_data = ""

  # ------------------------------------------------------- dpo (gptjax/training/preference.py)
  po = c.dpo = ml_collections.ConfigDict()
  po.beta = 0.1  # strength of the KL regularisation towards the reference
  po.label_smoothing = 0.0  # conservative DPO: the probability that a preference label is flipped
  po.loss = "sigmoid"  # sigmoid (DPO) | ipo
  po.kl_prompts = 16  # held-out prompts sampled at every eval for the policy's KL to the reference
  return c


def target_len(config) -> int:
  """The decoder length of encoder-decoder batches (data.target_len, 0 meaning data.seq_len);
  0 for the other families, whose batches have no decoder side."""
  if config.model.family != "encoder_decoder":
    return 0
  return int(config.data.target_len or config.data.seq_len)


def _one_of(path: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{path}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Checks a model config; raises ConfigError with one line naming the field."""
  _one_of("config.model.family", m.family, FAMILIES)
  _one_of("config.model.position", m.position, POSITIONS)
  _one_of("config.model.norm", m.norm, NORMS)
  _one_of("config.model.norm_position", m.norm_position, NORM_POSITIONS)
  _one_of("config.model.activation", m.activation, ACTIVATIONS)
  _one_of("config.model.attention_impl", m.attention_impl, ATTENTION_IMPLS)
  _one_of("config.model.dtype", m.dtype, DTYPES)
  _one_of("config.model.kernels", m.kernels, KERNELS)
  for name in filter(None, m.kernel_exclude.split(",")):
    _one_of("config.model.kernel_exclude", name.strip(), XLA_CPU_TRICKS)
  if m.kernels == "xla_cpu":  # can this machine run it? (builds the kernels once, then cached)
    from gptjax.model import ops  # pylint: disable=g-import-not-at-top
    ops.resolve_kernels(m.kernels)
  _one_of("config.model.remat", m.remat, REMAT_POLICIES)
  _one_of("config.model.pooling", m.pooling, ("first", "mean", "last"))
  for field in ("vocab_size", "embed_dim", "num_heads", "mlp_dim", "num_layers", "max_len"):
    if m[field] <= 0:
      raise ConfigError(f"config.model.{field}={m[field]} must be a positive integer")
  if m.head_dim == 0 and m.embed_dim % m.num_heads:
    raise ConfigError(
        f"config.model.num_heads={m.num_heads} does not divide config.model.embed_dim={m.embed_dim}; "
        "choose num_heads among the divisors of embed_dim or set config.model.head_dim")
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(
        f"config.model.num_kv_heads={kv} must divide config.model.num_heads={m.num_heads}")
  if m.position == "rope" and (m.head_dim or m.embed_dim // m.num_heads) % 2:
    raise ConfigError("config.model.position='rope' needs an even head dimension")
  if not 0.0 <= m.dropout_rate < 1.0 or not 0.0 <= m.attention_dropout_rate < 1.0:
    raise ConfigError("config.model.dropout_rate and attention_dropout_rate must be in [0, 1)")
  if m.family != "encoder_decoder" and m.num_decoder_layers:
    raise ConfigError("config.model.num_decoder_layers is only for family='encoder_decoder'")


def validate_lengths(c: ml_collections.ConfigDict) -> None:
  """Checks that the data's sequence lengths fit the model's position table."""
  m = c.model
  if m.position == "learned":
    for name in ("seq_len", "target_len"):
      n = c.data[name]
      if n > m.max_len:
        raise ConfigError(
            f"config.data.{name}={n} is longer than the learned position table "
            f"config.model.max_len={m.max_len}; lower it or raise max_len")


def _at_least(path: str, value, low) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
    raise ConfigError(f"{path}={value} must be a number >= {low}")


def validate_numbers(c: ml_collections.ConfigDict) -> None:
  """Counts, rates and sizes that would fail late (or train uphill) if left unchecked."""
  tr, d = c.train, c.data
  for name in ("steps", "grad_accum", "log_every", "ckpt_every", "keep"):
    _at_least(f"config.train.{name}", tr[name], 1)
  for name in ("eval_every", "eval_steps", "warmup_steps", "decay_steps", "weight_decay",
               "grad_clip"):
    _at_least(f"config.train.{name}", tr[name], 0)
  lr = tr.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ConfigError(f"config.train.learning_rate={lr} must be a positive finite number "
                      "(e.g. 1e-3)")
  for name in ("min_lr_ratio", "b1", "b2"):
    if not (isinstance(tr[name], (int, float)) and 0.0 <= tr[name] <= 1.0):
      raise ConfigError(f"config.train.{name}={tr[name]} must be in [0, 1]")
  for name in ("batch_size", "eval_batch_size", "seq_len"):
    _at_least(f"config.data.{name}", d[name], 1)
  for name in ("max_docs", "train_docs", "target_len"):
    _at_least(f"config.data.{name}", d[name], 0)
  if c.quantize not in QUANTIZE_KINDS:
    raise ConfigError(f"config.quantize={c.quantize!r} is not supported; allowed: "
                      f"{', '.join(repr(k) for k in QUANTIZE_KINDS)}")


def validate(c: ml_collections.ConfigDict) -> None:
  """All start-up checks that need only the config."""
  validate_model(c.model)
  _one_of("config.train.schedule", c.train.schedule, ("cosine", "linear", "constant"))
  _one_of("config.train.optimizer", c.train.optimizer, ("adamw", "adafactor"))
  _one_of("config.parallelism.mode", c.parallelism.mode, ("mesh", "pmap"))
  validate_numbers(c)
  batch_spec.check_family_objective(c.model.family, c.objective)
  if c.objective == "instruction" and not c.finetune.instruction_data:
    raise ConfigError("config.objective='instruction' needs config.finetune.instruction_data="
                      "PATH.jsonl (records with instruction, input, output)")
  if c.objective == "dpo":
    from gptjax.training import preference  # pylint: disable=g-import-not-at-top
    preference.validate_config(c)
  validate_lengths(c)


def _update(cfg: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
  for key, value in values.items():
    if key not in cfg:
      raise ConfigError(f"{prefix}{key} is not a config field")
    if isinstance(value, dict):
      _update(cfg[key], value, f"{prefix}{key}.")
    else:
      cfg[key] = value


def apply_variant(c: ml_collections.ConfigDict, variants: dict, arg: str) -> ml_collections.ConfigDict:
  """Applies the named variant to `c` and returns it locked against new fields."""
  arg = arg or "small"
  if arg not in variants:
    raise ConfigError(f"unknown config variant {arg!r}; choose one of: {', '.join(variants)}")
  _update(c, variants[arg], "config.")
  c.variant = arg
  c.lock()
  return c
