"""Fine-tuning modes (which params train) and instruction-tuning data (loss on the response only).

`trainable_mask` picks the trainable params for `config.finetune.trainable`;
`masked_optimizer` gives frozen params `optax.set_to_zero()`, so they get no
optimizer state and never change.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
import optax

from gptjax.data import jsonl_records
from gptjax.config_schema import ConfigError

HEAD_PARAMS = ("classifier", "pooler", "nsp_head", "mlm_transform", "mlm_norm", "mlm_bias", "lm_head")
TRAINABLE = ("head", "last_block", "all", "lora")


def _last_block_stack(params: dict, family: str) -> str:
  """The stack whose last layer `last_block` trains: the one feeding the head."""
  if family == "encoder_only":
    return "encoder"
  if family == "encoder_decoder" and "classifier" in params:
    return "encoder"  # the encoder-decoder classifier pools encoder states
  return "decoder"


def trainable_mask(params, trainable: str, family: str):
  """A pytree of bools shaped like the (unboxed) params: True where the param trains.

  head: classifier/pooler/nsp/mlm/lm_head params only; last_block: those plus
  the last layer (and final norm) of the stack feeding the head; all: everything;
  lora: nothing (the LoRA tree trains instead).
  """
  if trainable not in TRAINABLE:
    raise ConfigError(f"config.finetune.trainable={trainable!r} is not supported; allowed: "
                      f"{', '.join(TRAINABLE)}")
  params = nn.meta.unbox(params)
  if trainable in ("all", "lora"):
    return jax.tree.map(lambda _: trainable == "all", params)
  heads = [k for k in params if k in HEAD_PARAMS]
  train_keys: dict[str, Any] = {k: True for k in heads}
  if trainable == "last_block":
    stack = _last_block_stack(params, family)
    layer_names = [k for k in params.get(stack, {}) if k.startswith("layers_")]
    if not layer_names:
      raise ConfigError("config.finetune.trainable='last_block' needs config.model.scan_layers=False")
    last = max(layer_names, key=lambda k: int(k.split("_")[1]))
    train_keys[stack] = {last: True, "final_norm": True}
  elif not heads:
    raise ConfigError("config.finetune.trainable='head' but the model has no head parameters; "
                      "set config.model.num_classes or use last_block / lora")

  def mark(tree, spec):
    if not isinstance(spec, dict):
      return jax.tree.map(lambda _: bool(spec), tree)
    return {k: mark(v, spec.get(k, False)) for k, v in tree.items()}

  return mark(params, train_keys)


def masked_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`tx` on params where `mask` is True, `set_to_zero` (no state, no update) elsewhere."""
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_trainable(params, mask) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), nn.meta.unbox(params))
  total = sum(jax.tree.leaves(sizes))
  trained = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
  return trained, total


# ------------------------------------------------------------ instruction tuning
TokenizerLike = Union[Callable[[str], Sequence[int]], Any]


def _encode(tokenizer: TokenizerLike, text: str) -> list[int]:
  """Ids of `text` without special tokens, from a tokenizers.Tokenizer, an .encode() or a callable."""
  if not text:
    return []
  if hasattr(tokenizer, "encode"):
    try:
      enc = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
      enc = tokenizer.encode(text)
  else:
    enc = tokenizer(text)
  return list(getattr(enc, "ids", enc))


def format_sft_example(record: dict, template: str, tokenizer: TokenizerLike,
                       eos_id: int | None = None, max_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(ids_L, loss_mask_L): the templated prompt then the response; loss only on response (and EOS).

  Prompt and response are tokenized separately so the boundary is exact.
  """
  try:
    prompt = template.format(instruction=record["instruction"], input=record.get("input", "") or "")
  except KeyError as e:
    raise ConfigError(f"config.finetune.prompt_template names an unknown field {e}; "
                      "available: {instruction}, {input}") from None
  prompt_ids = _encode(tokenizer, prompt)
  response_ids = _encode(tokenizer, record["output"]) + ([eos_id] if eos_id is not None else [])
  ids_L = np.asarray(prompt_ids + response_ids, np.int32)
  mask_L = np.asarray([0] * len(prompt_ids) + [1] * len(response_ids), np.int32)
  if max_len:
    ids_L, mask_L = ids_L[:max_len], mask_L[:max_len]
  return ids_L, mask_L


def load_sft_jsonl(path: str) -> list[dict]:
  """Records {instruction, input, output} from a JSONL file; one-line ConfigError on a bad line."""
  records = jsonl_records.read_records(path, "instruction data", ("instruction", "output"))
  for rec in records:
    rec.setdefault("input", "")
  return records


def sft_batch(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Pads (ids, loss_mask) pairs to next-token inputs/targets/weights of shape [B, seq_len].

  targets[t] = ids[t+1]; weights[t] = loss_mask[t+1], so only response tokens are predicted.
  """
  b = len(examples)
  inputs = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  weights = np.zeros((b, seq_len), np.float32)
  input_mask = np.zeros((b, seq_len), np.int32)
  for i, (ids, mask) in enumerate(examples):
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    n = len(ids) - 1
    if n <= 0:
      continue
    inputs[i, :n], targets[i, :n], weights[i, :n] = ids[:-1], ids[1:], mask[1:]
    input_mask[i, :n] = 1
  return {"inputs": inputs, "targets": targets, "weights": weights, "input_mask": input_mask}
