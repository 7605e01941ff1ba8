"""gptjax launcher.

  python run.py --config=configs/gpt.py:small --workdir=workdirs/gpt --mode=train
  python run.py --config=configs/bert.py:base --mode=summary
  python run.py --config=configs/gpt.py:small --workdir=workdirs/gpt --mode=generate --prompt="ROMEO:"

Any config field can be overridden: --config.train.steps=100 --config.model.num_layers=4.
"""

import importlib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt.py:small.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the tokenizer live.")
_MODE = flags.DEFINE_enum(
    "mode", "train",
    ["train", "summary", "data", "generate", "icl", "embed", "analyze", "eval"],
    "What to do with the config.")
flags.DEFINE_string("prompt", None, "--mode=generate: the prompt text.")
flags.DEFINE_string("prompts_file", None, "--mode=generate: a file with one prompt per line.")
flags.DEFINE_string("input_file", None, "--mode=embed: a text file, one sentence per line.")
flags.DEFINE_string("output", None, "--mode=embed/analyze: where to write results.")
flags.DEFINE_string("other_workdir", None, "--mode=analyze: a second checkpoint to compare with.")
flags.DEFINE_string("sentence", None, "--mode=analyze: a sentence for attention maps.")
flags.DEFINE_string("shots", "0,1,4", "--mode=icl: numbers of demonstrations to evaluate.")
flags.DEFINE_integer("icl_examples", 200, "--mode=icl: evaluation examples per shot count.")

# mode -> "module:function"; each function takes (config, workdir, flag_values).
MODES = {
    "summary": "gptjax.analysis.summary_cli:main",
    "train": "gptjax.training.train:main",
    "data": "gptjax.data.report:main",
    "generate": "gptjax.inference.generate:main",
    "icl": "gptjax.inference.icl:main",
    "embed": "gptjax.inference.sentence_embeddings:main",
    "analyze": "gptjax.analysis.checkpoint_analysis:main",
    "eval": "gptjax.training.train:evaluate_main",
}

NEEDS_WORKDIR = {"train", "generate", "analyze", "eval"}


def main(argv):
  """Validates the config, then runs the requested mode."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # orbax and TFDS log through absl (every file at INFO, routine notes at WARNING); gptjax
    # prints its own one-line notes, so they show only when --verbosity asks for them
    logging.set_verbosity(logging.ERROR)
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/gpt.py:small")
  mode = _MODE.value
  if mode in NEEDS_WORKDIR and not _WORKDIR.value:
    _fail(f"--mode={mode} needs --workdir=DIR (where checkpoints and metrics live)")
  if config.model.kernels != "xla":
    # the XLA:CPU backend's malloc settings, before JAX starts its threads (no-op off CPU hosts)
    from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.configure()
  from gptjax import config_schema  # pylint: disable=g-import-not-at-top
  try:
    config_schema.validate(config)
    module_name, fn_name = MODES[mode].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    fn(config, _WORKDIR.value, flags.FLAGS)
  except config_schema.ConfigError as e:
    _fail(str(e))
  except FileNotFoundError as e:
    _fail(str(e))


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """Parses flags; a mistyped or ill-typed config field is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _fail(f"bad flag: {_unknown_field_message(str(e), argv)}")
  except (TypeError, ValueError, flags.Error) as e:
    lines = [ln for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
    text = lines[-1] if "Traceback" in str(e) else " ".join(" ".join(lines).split())
    text = text.replace("\\'", "'").strip("'\"\\ ")
    _fail(f"bad flag: {text}")


def _unknown_field_message(text: str, argv) -> str:
  """'--config.model.nmu_layers is not a config field; did you mean config.model.num_layers?'"""
  text = text.replace("\\n", "\n").replace("\\'", "'")
  key = re.search(r"'([A-Za-z0-9_]+)'", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  if not key:
    return " ".join(text.split()).strip("'\"\\ ")
  flag = next((a.split("=", 1)[0] for a in argv
               if a.startswith("--config.") and a.split("=", 1)[0].endswith("." + key.group(1))),
              f"--config...{key.group(1)}")
  message = f"{flag} is not a config field"
  if hint:
    message += f"; did you mean {flag[2:].rsplit('.', 1)[0]}.{hint.group(1)}?"
  return message


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
