"""configs/<family>.py:<variant> loaded as run.py loads them, for the experiment scripts."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(family: str, variant: str = "tiny", **overrides):
  """configs/<family>.py:<variant>, then dotted overrides (**{"model.num_layers": 1}) applied."""
  spec = importlib.util.spec_from_file_location(f"cfg_{family}", REPO / "configs" / f"{family}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
