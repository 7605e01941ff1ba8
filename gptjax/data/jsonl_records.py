"""JSONL record files written by users (instruction and preference data), read with one-line errors."""

from __future__ import annotations

import json
import os

from gptjax.config_schema import ConfigError


def read_records(path: str, what: str, fields: tuple[str, ...]) -> list[dict]:
  """The JSON objects of a JSONL file, each with string `fields`; else one ConfigError line.

  `what` names the data in the messages ("instruction data"); blank lines are skipped.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"{what} {path!r} does not exist")
  records = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(rec, dict):
        raise ConfigError(f"{path}:{n}: record {len(records) + 1} is not a JSON object")
      for key in fields:
        if not isinstance(rec.get(key), str):
          raise ConfigError(f"{path}:{n}: record {len(records) + 1} has no string {key!r} field "
                            f"(each record needs {', '.join(fields)})")
      records.append(rec)
  if not records:
    raise ConfigError(f"{what} {path!r} has no records")
  return records
