"""The sweep's spec: parsing `--sweep`/`--set`/`--sweep_file`, checking every field and value
against the base config, the grid or random points, and each point's resolved config and run id.

Everything here raises ConfigError (one line naming the field) before a single run starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import random
import re
from typing import Any

from gptjax import config_schema
from gptjax.config_schema import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
_DIST = re.compile(r"^(uniform|loguniform|randint)\(\s*([^,]+)\s*,\s*([^)]+)\s*\)$")


def load_base_config(spec: str):
  """The locked ConfigDict of `FILE:VARIANT`, loaded as run.py loads it."""
  path, _, variant = spec.partition(":")
  full = pathlib.Path(path) if os.path.isabs(path) else REPO / path
  if not full.exists():
    raise ConfigError(f"--config={spec}: no such config file {full}")
  module_spec = importlib.util.spec_from_file_location(f"sweep_cfg_{full.stem}", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def field_name(name: str) -> str:
  """A dotted config field without a leading `config.`."""
  name = name.strip()
  return name[len("config."):] if name.startswith("config.") else name


def _leaf(config, field: str, where: str):
  """(parent ConfigDict, leaf key) of a dotted field; ConfigError naming it if absent."""
  node = config
  *parents, leaf = field.split(".")
  base = f"{config.name}:{config.variant}" if "name" in config else "the base config"
  for p in parents:
    if not hasattr(node, "keys") or p not in node:
      raise ConfigError(f"{where}: config.{field} is not a config field of {base}")
    node = node[p]
  if not hasattr(node, "keys") or leaf not in node or hasattr(node[leaf], "keys"):
    raise ConfigError(f"{where}: config.{field} is not a config field of {base}")
  return node, leaf


def parse_value(config, field: str, text: Any, where: str):
  """`text` as the type of config.`field` (bool/int/float/str)."""
  node, leaf = _leaf(config, field, where)
  current = node[leaf]
  if not isinstance(text, str):
    value = text
  elif isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"{where}: config.{field}={text!r} is not a bool")
    value = text.lower() in ("true", "1")
  elif isinstance(current, int):
    try:
      value = int(text) if re.fullmatch(r"-?\d+", text.strip()) else int(float(text))
    except ValueError:
      raise ConfigError(f"{where}: config.{field}={text!r} is not an integer") from None
  elif isinstance(current, float):
    try:
      value = float(text)
    except ValueError:
      raise ConfigError(f"{where}: config.{field}={text!r} is not a number") from None
  elif isinstance(current, str):
    value = text
  else:
    raise ConfigError(f"{where}: config.{field} has type {type(current).__name__}, which a sweep "
                      "cannot set")
  if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
    if value != int(value):
      raise ConfigError(f"{where}: config.{field}={value} is not an integer")
    value = int(value)
  return value


def parse_spec(text: str, where: str) -> dict[str, Any]:
  """'a.b=1,2;c.d=x' -> {'a.b': ['1', '2'], 'c.d': ['x']}; distributions stay strings."""
  spec: dict[str, Any] = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    if "=" not in part:
      raise ConfigError(f"{where}: {part!r} is not FIELD=VALUES")
    field, values = part.split("=", 1)
    values = values.strip()
    spec[field_name(field)] = values if _DIST.match(values) else [v.strip() for v in values.split(",")]
  return spec


def checked_spec(config, spec: dict[str, Any], where: str, random_ok: bool) -> dict[str, Any]:
  """Every field exists and every value parses; distributions become (kind, low, high)."""
  out = {}
  for field, values in spec.items():
    field = field_name(field)
    if isinstance(values, str):
      m = _DIST.match(values.strip())
      if not m:
        values = [values]
      else:
        _leaf(config, field, where)
        kind, low, high = m.group(1), float(m.group(2)), float(m.group(3))
        if not random_ok:
          raise ConfigError(f"{where}: config.{field}={values} is a distribution; it needs --random=N")
        if high <= low or (kind == "loguniform" and low <= 0):
          raise ConfigError(f"{where}: config.{field}={values} is an empty or invalid range")
        out[field] = (kind, low, high)
        continue
    if not isinstance(values, (list, tuple)) or not values:
      raise ConfigError(f"{where}: config.{field} needs a non-empty list of values")
    out[field] = [parse_value(config, field, v, where) for v in values]
  return out


def _sample(rng: random.Random, dist):
  kind, low, high = dist
  if kind == "uniform":
    return rng.uniform(low, high)
  if kind == "randint":
    return rng.randint(int(low), int(high))
  return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")


def points(spec: dict[str, Any], num_random: int, seed: int) -> list[dict[str, Any]]:
  """The grid (num_random=0) or `num_random` random points of it, in a fixed order."""
  fields = list(spec)
  if not num_random:
    return [dict(zip(fields, combo)) for combo in itertools.product(*(spec[f] for f in fields))]
  rng = random.Random(seed)
  grid_size = math.prod(len(v) for v in spec.values() if isinstance(v, list))
  has_dist = any(isinstance(v, tuple) for v in spec.values())
  want = num_random if has_dist else min(num_random, grid_size)
  out, seen = [], set()
  for _ in range(100 * want):
    if len(out) == want:
      break
    point = {f: (_sample(rng, v) if isinstance(v, tuple) else rng.choice(v)) for f, v in spec.items()}
    key = json.dumps(point, sort_keys=True)
    if key not in seen:
      seen.add(key)
      out.append(point)
  return out


def resolve(base_spec: str, overrides: dict[str, Any]):
  """The base config with `overrides` applied, validated as run.py validates it."""
  config = load_base_config(base_spec)
  for field, value in overrides.items():
    node, leaf = _leaf(config, field, "--sweep")
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigError(f"config.{field}={value!r}: {' '.join(str(e).split())}") from None
  config_schema.validate(config)
  return config


# Machine-local or display-only fields: never part of what a run computes.
LOCAL_FIELDS = ("data.raw_dir", "data.tfds_data_dir", "train.progress")


def run_id(base_spec: str, overrides: dict[str, Any]) -> str:
  """The id of a run: a hash of its sweep point (base config and overrides).

  The point, not the resolved config: a code change that adds a config field must not turn every
  finished run into a new one. A changed value under a finished run is caught by `config_drift`.
  """
  text = json.dumps([base_spec, overrides], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def legacy_run_id(config) -> str:
  """The run id before 2026-11-30: a hash of the fully resolved config (less LOCAL_FIELDS)."""
  resolved = json.loads(config.to_json_best_effort())
  for field in LOCAL_FIELDS:
    section, key = field.split(".")
    resolved.get(section, {}).pop(key, None)
  text = json.dumps(resolved, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_drift(config, recorded: dict) -> list[str]:
  """`field: recorded -> now` for every field a finished run recorded with another value.

  Fields only one side has (added or removed by a code change) are not drift.
  """
  now, then = _flat(json.loads(config.to_json_best_effort())), _flat(recorded)
  return [f"{k}: {then[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & then.keys())
          if k not in LOCAL_FIELDS and now[k] != then[k]]
