"""Instruction-tuning data: templated prompt + response, with the loss on the response only.

Which parameters train in a fine-tuning run is gptjax/transfer/trainable.py.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np

from gptjax.data import jsonl_records
from gptjax.config_schema import ConfigError

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
