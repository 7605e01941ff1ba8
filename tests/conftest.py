"""Shared test fixtures: configs loaded exactly as run.py loads them."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GPTJAX_RAW_DIR", str(REPO.parent / "shared" / "data"))


def _session_compilation_cache() -> None:
  """One XLA compilation cache per test session, empty when it starts and removed at its end.

  Many tests build the same tiny models (a resumed run, a fine-tune beside its scratch run, the
  run.py and experiment subprocesses, which inherit the variable, and pytest-xdist's workers):
  each executable is compiled once and loaded from the cache after that. Set
  JAX_COMPILATION_CACHE_DIR yourself to keep a cache between sessions.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = tempfile.mkdtemp(prefix="gptjax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  if "jax" in sys.modules:  # imported before this file: the variables came too late for it
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_session_compilation_cache()


from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top,wrong-import-position  (one loader for tests and experiments)


@pytest.fixture(name="load_config")
def _load_config_fixture():
  return load_config


@pytest.fixture(scope="session", name="data_cache")
def _data_cache_fixture(tmp_path_factory):
  """A fresh GPTJAX_CACHE for the session: TFDS builds, tokenizers and token arrays are made once."""
  path = tmp_path_factory.mktemp("gptjax_cache")
  old = os.environ.get("GPTJAX_CACHE")
  os.environ["GPTJAX_CACHE"] = str(path)
  yield path
  if old is None:
    os.environ.pop("GPTJAX_CACHE", None)
  else:
    os.environ["GPTJAX_CACHE"] = old


def run_tiny_cli(cache, *args, timeout=240):
  """`run.py --config=configs/gpt.py:tiny ARGS` with GPTJAX_CACHE=cache: (returncode, stdout, stderr)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, GPTJAX_CACHE=str(cache))
  cmd = [sys.executable, str(REPO / "run.py"), "--config=configs/gpt.py:tiny",
         "--config.train.progress=False", *args]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  return r.returncode, r.stdout, r.stderr


def one_error_line(stderr: str) -> str:
  """The single `error: ...` line a failed run printed (fails when there is anything else)."""
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
  return lines[0]


# The longest tests (end-to-end experiment smokes, subprocess runs: 20-70 s each on 2 cores),
# by file and test function. They run first: with pytest-xdist's `-n 2` a worker that picks one
# of them up last keeps the session waiting while the other worker idles. Only tests without
# module-scoped fixtures are listed, so moving them splits no fixture's module.
LONGEST_FIRST = (
    ("test_preference.py", "test_sentiment_dpo_smoke_end_to_end_then_skips"),
    ("test_scaling.py", "test_smoke_preset_end_to_end_then_skips_on_rerun"),
    ("test_experiments.py", "test_smoke_preset_two_arms_end_to_end_then_skips_on_rerun"),
    ("test_retrieval.py", "test_smoke_experiment_then_generation_with_sources"),
    ("test_throughput_script.py", "test_tiny_gpt_and_t5_rows_with_breakdown"),
    ("test_sweep.py", "test_two_runs_local_executor_then_skip_on_rerun"),
    ("test_train.py", "test_cli_writes_metrics_and_a_loadable_checkpoint"),
    ("test_train.py", "test_init_from_a_workdir_fine_tunes_with_its_tokenizer_and_rejects_other_shapes"),
    ("test_train.py", "test_each_objective_trains_its_family"),
    ("test_train.py", "test_ten_then_twenty_steps_equal_twenty_straight"),
)


def pytest_collection_modifyitems(items):
  """Puts the LONGEST_FIRST tests first, in that order; the rest keep their order."""
  rank = {key: i for i, key in enumerate(LONGEST_FIRST)}
  def key(item):
    return rank.get((item.path.name, getattr(item, "originalname", item.name)), len(rank))
  items.sort(key=key)  # stable: equal keys keep the collection order
