"""`run.py --mode=generate`: completions from the latest checkpoint of a workdir.

  python run.py --config=configs/gpt.py:small --workdir=workdirs/gpt --mode=generate \
      --prompt="ROMEO:" --config.generate.temperature=0.8 --config.generate.top_p=0.9
  python run.py --config=configs/gpt.py:small --workdir=/tmp/none --mode=generate \
      --config.init_from=hf:workdirs/smollm2_135m_instruct_q4_1 --prompt="The capital of France is"

With `config.init_from=hf:DIR` and no checkpoint in the workdir, the imported model and its
tokenizer.json are used as they are.

The model architecture and tokenizer come from the checkpoint; the decoding settings come from
`config.generate` of the command line (max_new_tokens, temperature, top_k, top_p, num_beams,
length_penalty, repetition_penalty, stop as "|"-separated strings, seed).
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from gptjax.inference import decode

from gptjax.model import family as model_family
from gptjax.model import models
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig


def decoder_start_id(config, tokenizer) -> int:
  """The first decoder input of an encoder-decoder model, as the input pipeline trains it."""
  if config.objective == "denoise" and tokenizer.eos_id is not None:
    return tokenizer.eos_id  # BART
  return tokenizer.pad_id if tokenizer.pad_id is not None else 0  # T5


def complete(config, params, tokenizer, prompts: list[str], settings: decode.DecodeSettings
             ) -> list[str]:
  """The generated text after each prompt (stop strings and what follows them removed)."""
  cfg = ModelConfig.from_config(config.model)
  model_family.of(cfg).check_generates("generate text (--mode=generate)")
  model = models.make_model(cfg)
  ids = [tokenizer.encode(p) for p in prompts]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  out = decode.generate(model, params, ids, settings, tokenizer.eos_id, pad,
                        rng=jax.random.key(settings.seed),
                        start_id=decoder_start_id(config, tokenizer))
  stops = [s for s in str(config.generate.stop).split("|") if s] if config.generate.stop else []
  texts = []
  for completion in out:
    text = tokenizer.decode(completion)
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    texts.append(text[:cut])
  return texts


def sample_text(config, params, tokenizer, prompt: str, max_new_tokens: int) -> str:
  """Prompt plus a completion with `config.generate`'s settings (max_new_tokens overridden).

  max_new_tokens is capped at what the context leaves after the prompt.
  """
  max_new_tokens = min(max_new_tokens, config.model.max_len - len(tokenizer.encode(prompt)))
  settings = decode.settings_from_config(config, tokenizer)
  settings = decode.DecodeSettings(**{**settings.__dict__, "max_new_tokens": max_new_tokens})
  return prompt + complete(config, params, tokenizer, [prompt], settings)[0]


def print_training_sample(config, workdir: str, prompt: str = "ROMEO:",
                          max_new_tokens: int = 64) -> None:
  """What `make train` prints at the end: a short sample from the model it just trained."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt_config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  ckpt_config.unlock()
  ckpt_config.generate = config.generate
  print(f"sample ({prompt!r}, {max_new_tokens} new tokens):")
  print(sample_text(ckpt_config, params, tokenizer, prompt, max_new_tokens), flush=True)


def read_prompts(flag_values) -> list[str]:
  """--prompt, or one prompt per line of --prompts_file (blank lines skipped)."""
  prompt: Optional[str] = getattr(flag_values, "prompt", None)
  path: Optional[str] = getattr(flag_values, "prompts_file", None)
  prompts = [] if prompt is None else [prompt.replace("\\n", "\n")]
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--prompts_file={path} does not exist")
    with open(path, encoding="utf-8") as f:
      from_file = [ln.rstrip("\n").replace("\\n", "\n") for ln in f if ln.strip()]
    if not from_file:
      raise ConfigError(f"--prompts_file={path} has no non-blank line; put one prompt per line")
    prompts += from_file
  if not prompts:
    raise ConfigError("--mode=generate needs --prompt=TEXT or --prompts_file=FILE")
  if any(not p for p in prompts):
    raise ConfigError("--prompt is empty; give some text to continue")
  return prompts


def imported_for_inference(config):
  """(config, params, tokenizer) of `config.init_from=hf:DIR`: its architecture, weights and
  tokenizer.json, with the rest of `config` (decoding settings) unchanged."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
  directory = config.init_from[3:]
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    raise ConfigError(f"config.init_from={config.init_from}: no tokenizer.json to generate with")
  cfg, params = hf_import.load_hf(directory)
  config = config.copy_and_resolve_references()
  config.model.update(dataclasses.asdict(cfg))
  return config, params, tokenization.load_tokenizer_file(directory)


def main(config, workdir: str, flag_values) -> None:
  """`run.py --mode=generate`: restores WORKDIR's latest checkpoint, prints each completion."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  prompts = read_prompts(flag_values)
  settings = decode.settings_from_config(config)  # validated before the (slow) restore
  decode.check_settings(settings)
  index = None
  if config.generate.retrieval_index:  # a stale or foreign index fails before the restore
    from gptjax.inference import retrieval  # pylint: disable=g-import-not-at-top
    index = retrieval.open_for_generation(config.generate.retrieval_index)
  if config.init_from.startswith("hf:") and not checkpointing.has_checkpoint(workdir):
    ckpt_config, params, tokenizer = imported_for_inference(config)
  else:
    ckpt_config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  ckpt_config.unlock()
  ckpt_config.generate = config.generate
  settings = decode.settings_from_config(ckpt_config, tokenizer)
  if config.quantize == "int8":  # int8 weights read directly by the decoding steps
    from gptjax.transfer import quantize  # pylint: disable=g-import-not-at-top
    params = quantize.quantize_params(params)
  inputs, sources = prompts, None
  if index is not None:
    g = config.generate
    max_len = ckpt_config.model.max_len
    inputs, sources = retrieval.augment_prompts(
        index, prompts, tokenizer, g.retrieval_k, g.retrieval_query_tokens,
        max_len - min(settings.max_new_tokens, max_len // 2))
  texts = complete(ckpt_config, params, tokenizer, inputs, settings)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    if len(prompts) > 1:
      print(f"=== {i}")
    for used in (sources[i] if sources else []):
      print(f"[retrieved {used['rank']}] {used['source']} (score {used['score']:.3f}): "
            f"{used['text'][:80]}...", flush=True)
    print(prompt + text, flush=True)
