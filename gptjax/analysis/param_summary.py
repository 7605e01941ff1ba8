"""Per-module parameter tables computed from shapes alone (`jax.eval_shape`)."""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from gptjax.model import models
from gptjax.model.config import ModelConfig


def param_shapes(cfg: ModelConfig, seq_len: int = 8) -> Any:
  """The parameter tree of `cfg` as ShapeDtypeStructs; nothing is allocated."""
  boxed = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), 1, seq_len))
  return nn.meta.unbox(boxed)


def flat_params(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) for every parameter leaf, paths joined by '/'."""
  return [("/".join(path), tuple(leaf.shape))
          for path, leaf in sorted(traverse_util.flatten_dict(tree).items())]


def count_params(tree: Any) -> int:
  """Total number of parameters in a (possibly abstract) tree."""
  return int(sum(int(np.prod(shape)) for _, shape in flat_params(tree)))


def module_table(tree: Any, depth: int = 3) -> list[tuple[str, int, str]]:
  """Rows (module path truncated to `depth`, parameter count, shapes) in tree order."""
  counts: dict[str, int] = collections.OrderedDict()
  shapes: dict[str, list[str]] = collections.defaultdict(list)
  for name, shape in flat_params(tree):
    parts = name.split("/")
    module = "/".join(parts[: min(depth, len(parts) - 1)]) or parts[0]
    counts[module] = counts.get(module, 0) + int(np.prod(shape))
    shapes[module].append(f"{parts[-1]}{list(shape)}")
  natural = lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)]
  return [(m, counts[m], " ".join(shapes[m])) for m in sorted(counts, key=natural)]


def format_table(rows: Iterable[tuple[str, int, str]], total: int) -> str:
  """A plain-text table of the rows, ending with `total params: N`."""
  rows = list(rows)
  width = max([len(r[0]) for r in rows] + [6])
  lines = [f"{'module':<{width}}  {'params':>12}  shapes", "-" * (width + 40)]
  for module, n, shape_text in rows:
    lines.append(f"{module:<{width}}  {n:>12,}  {shape_text}")
  lines.append("-" * (width + 40))
  lines.append(f"total params: {total}")
  return "\n".join(lines)
