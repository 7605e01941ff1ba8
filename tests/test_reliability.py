"""Issue 17: a resumed run never silently changes model, data or vocabulary; one writer per workdir;
checkpoints carry checksums; caches follow their inputs; library logs stay quiet.

Each test runs the command (or the call run.py makes), then checks the exit code or ConfigError,
the one line, and the files left on disk. W is one tiny GPT run of 10 steps shared by the module.
Bad values and broken inputs (one line, exit 2, before compiling): tests/test_bad_input.py.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, one_error_line, run_tiny_cli
from gptjax.data import corpora, input_pipeline, tokenization
from gptjax.training import checkpointing, resume_check, train, workdir_guard
from gptjax.config_schema import ConfigError

TINY = {"train.log_every": 1, "train.eval_every": 0, "train.progress": False,
        "train.ckpt_every": 5, "train.steps": 10}


def _tree(path: pathlib.Path) -> dict:
  """Every file under `path` with its bytes (to show nothing changed), the lock's PID aside."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file() and p.name != ".lock"}


def _steps(path) -> list:
  return [json.loads(l)["step"] for l in open(path / "metrics.jsonl") if l.strip()]


@pytest.fixture(scope="module", name="trained")
def _trained(tmp_path_factory, data_cache):
  """W: 10 steps of gpt:tiny (checkpoints 5 and 10) through the CLI, on a fresh cache."""
  w = tmp_path_factory.mktemp("rel") / "W"
  code, out, err = run_tiny_cli(data_cache, f"--workdir={w}", "--config.train.steps=10",
                        "--config.train.ckpt_every=5", "--config.train.eval_every=0",
                        "--config.train.log_every=1")
  assert code == 0, err[-3000:]
  return w, out, err


def _copy(trained, tmp_path) -> pathlib.Path:
  dst = tmp_path / "W"
  shutil.copytree(trained[0], dst, ignore=shutil.ignore_patterns(".lock"))
  return dst


# ------------------------------------------------------------------ 1. resume with another config
def test_resume_with_a_changed_model_is_one_line_and_keeps_everything(trained, tmp_path, data_cache):
  w = _copy(trained, tmp_path)
  before = _tree(w)
  code, out, err = run_tiny_cli(data_cache, f"--workdir={w}", "--config.train.steps=15",
                        "--config.model.num_layers=3")
  assert code == 2
  line = one_error_line(err)
  assert "model.num_layers 2 -> 3" in line and "new --workdir" in line and "init_from=" in line
  assert _tree(w) == before  # no checkpoint set aside, metrics and manifest untouched
  assert not (w / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("override,field", [
    ({"objective": "prefix_lm"}, "objective"),
    ({"data.tokenizer.vocab_size": 400}, "data.tokenizer.vocab_size"),
    ({"data.corpus": "wikitext2"}, "data.corpus"),
    ({"data.max_docs": 50}, "data.max_docs"),
    ({"train.optimizer": "adafactor"}, "train.optimizer"),  # other optimizer state
])
def test_resume_refuses_semantic_changes(trained, tmp_path, data_cache, override, field):
  del data_cache
  w = _copy(trained, tmp_path)
  config = load_config("gpt", "tiny", **TINY, **override)
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, str(w))
  assert field in str(e.value) and "\n" not in str(e.value)
  assert sorted(os.listdir(w / "checkpoints")) == ["10", "5"]


def test_resume_reports_in_one_line_sets_aside_only_the_unreadable_and_keeps_history(
    trained, tmp_path, data_cache, capsys):
  """Step 10's array files are gone, a kill left a half-written step 11, and the learning rate
  and log cadence change: the run resumes from 5 and says all of it in one line."""
  del data_cache
  w = _copy(trained, tmp_path)
  for f in (w / "checkpoints" / "10" / "state").rglob("*"):
    if f.is_file() and "ocdbt.process_0" in str(f):
      f.unlink()
  shutil.copytree(w / "checkpoints" / "5", w / "checkpoints" / "11.orbax-checkpoint-tmp")
  config = load_config("gpt", "tiny", **dict(TINY, **{"train.steps": 12, "train.learning_rate": 5e-4,
                                                        "train.log_every": 2}))
  metrics = train.train_and_evaluate(config, str(w))
  assert metrics["step"] == 12
  lines = [l for l in capsys.readouterr().out.splitlines() if "step" in l and "unigram" not in l]
  assert len(lines) == 1, lines
  line = lines[0]
  assert line.startswith(f"resumed from {w / 'checkpoints'} at step 5; ")
  assert f"moved the unreadable checkpoint of step 10 to {w / 'corrupt_checkpoints' / '10'}" in line
  assert "set aside an incomplete save of step 11" in line
  assert "changed train.learning_rate 0.001 -> 0.0005, train.log_every 1 -> 2" in line
  assert (w / "corrupt_checkpoints" / "10" / "state").is_dir()  # kept, not deleted
  assert (w / "corrupt_checkpoints" / "11.incomplete" / "state").is_dir()
  assert sorted(os.listdir(w / "checkpoints")) == ["10", "12", "5"]
  manifest = json.load(open(w / "manifest.json"))
  assert manifest["history"][-1]["from_step"] == 5
  assert manifest["history"][-1]["changed"]["train.steps"] == [10, 12]
  assert manifest["config"]["train"]["learning_rate"] == 5e-4
  # metrics.jsonl: steps 1-5 of the first run kept, 6-12 from this one, none twice
  assert _steps(w) == [1, 2, 3, 4, 5, 6, 8, 10, 12]


# ------------------------------------------------------------------ 6. checksums
def _flip_bytes(w: pathlib.Path, step: int) -> None:
  files = [p for p in (w / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and "ocdbt.process_0/d" in str(p)]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  biggest.write_bytes(bytes(data))


def test_flipped_bytes_fail_the_checksum_and_eval_uses_the_previous(trained, tmp_path, data_cache,
                                                                    capsys):
  del data_cache
  w = _copy(trained, tmp_path)
  _flip_bytes(w, 10)
  capsys.readouterr()
  config, params, _ = checkpointing.restore_for_inference(str(w))
  out = capsys.readouterr().out
  assert "checkpoint at step 10 is unreadable" in out and "checksum" in out
  ckpt = checkpointing.Checkpointer(str(w), read_only=True, async_save=False)
  assert ckpt.restore_meta(5)["step"] == 5 and sorted(ckpt.steps()) == [5, 10]  # nothing moved
  # the restored params are step 5's, finite
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  del config


def test_inference_restores_a_chosen_step_and_names_the_steps_it_has(trained):
  w = str(trained[0])
  latest = jax.tree.leaves(checkpointing.restore_for_inference(w)[1])
  at_5 = jax.tree.leaves(checkpointing.restore_for_inference(w, step=5)[1])
  at_10 = jax.tree.leaves(checkpointing.restore_for_inference(w, step=10)[1])
  assert all(np.array_equal(a, b) for a, b in zip(latest, at_10))
  assert not all(np.array_equal(a, b) for a, b in zip(at_5, at_10))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7 .* its steps: 5, 10"):
    checkpointing.restore_for_inference(w, step=7)


def test_checksums_are_saved_beside_every_array(trained):
  ckpt = checkpointing.Checkpointer(str(trained[0]), read_only=True, async_save=False)
  arrays = ckpt.restore_meta(10)["arrays"]
  assert any("params" in k for k in arrays) and any("opt_state" in k for k in arrays)
  assert all(len(v) == 3 and isinstance(v[2], int) for v in arrays.values())


# ------------------------------------------------------------------ 2. cache keys
def test_token_cache_follows_file_edits_and_max_docs(tmp_path, data_cache):
  del data_cache
  src = (REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()
  blocks = src.split("\n\n")
  corpus = tmp_path / "notes.txt"
  corpus.write_text("\n\n".join(blocks[:60]))
  tok_path = tmp_path / "tok"
  base = {"data.corpus": "text_files", "data.text_files": str(corpus)}
  tok = tokenization.load_or_train_tokenizer(load_config("gpt", "tiny", **base))
  tok.save(str(tok_path))  # a fixed tokenizer, as with a resumed workdir or init_from
  fixed = dict(base, **{"data.tokenizer.path": str(tok_path / "tokenizer.json")})
  first = input_pipeline.tokenized(load_config("gpt", "tiny", **fixed), tok, "train", "stream")
  corpus.write_text("\n\n".join(blocks[60:120]))  # the user edits the file
  edited = input_pipeline.tokenized(load_config("gpt", "tiny", **fixed), tok, "train", "stream")
  assert not np.array_equal(first["tokens"], edited["tokens"])
  expected = tok.encode(corpora.shakespeare_docs("\n\n".join(blocks[60:120]))[0])
  assert list(edited["tokens"][1:1 + len(expected)]) == expected
  three = input_pipeline.tokenized(load_config("gpt", "tiny", **fixed, **{"data.max_docs": 3}),
                                   tok, "train", "stream")
  all_docs = input_pipeline.tokenized(load_config("gpt", "tiny", **fixed, **{"data.max_docs": 0}),
                                      tok, "train", "stream")
  assert len(three["tokens"]) < len(all_docs["tokens"]) == len(edited["tokens"])


def test_resume_after_the_corpus_changed_is_one_line(trained, tmp_path, data_cache):
  del data_cache
  w = _copy(trained, tmp_path)
  raw = tmp_path / "raw" / "tinyshakespeare"
  raw.mkdir(parents=True)
  src = (REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()
  (raw / "input.txt").write_text(src.replace("ROMEO", "ROMEUS"))  # an edited copy of the corpus
  config = load_config("gpt", "tiny", **dict(TINY, **{"data.raw_dir": str(raw.parent)}))
  with pytest.raises(ConfigError, match="corpus files with fingerprint") as e:
    train.train_and_evaluate(config, str(w))
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(w / "checkpoints")) == ["10", "5"]


# ------------------------------------------------------------------ 3. init_from
def test_failed_init_from_writes_nothing_and_the_next_run_takes_the_sources_vocab(
    trained, tmp_path, data_cache):
  w1 = tmp_path / "W1"
  code, _, err = run_tiny_cli(data_cache, f"--workdir={w1}", "--config.init_from=/nonexistent",
                      "--config.train.steps=2")
  assert code == 2 and "config.init_from='/nonexistent'" in one_error_line(err)
  assert not (w1 / "tokenizer.json").exists() and not (w1 / "checkpoints").exists()
  # a tokenizer left by an older failed run (here: another vocabulary) is not trusted
  other = tokenization.load_or_train_tokenizer(load_config("gpt", "tiny", **{
      "data.corpus": "sst2", "data.max_docs": 200}))
  other.save(str(w1))
  config = load_config("gpt", "tiny", **dict(TINY, **{"train.steps": 1, "init_from": str(trained[0])}))
  _, _, tokenizer, _ = train.setup(config, str(w1))  # what train_and_evaluate trains with
  assert tokenizer.fingerprint == tokenization.load_tokenizer_file(
      str(trained[0] / "tokenizer.json")).fingerprint
  assert (w1 / "tokenizer.json").read_text() == (trained[0] / "tokenizer.json").read_text()


# ------------------------------------------------------------------ 5. one writer
def test_a_second_writer_gets_the_holders_pid_and_exit_2(trained, tmp_path, data_cache):
  w = _copy(trained, tmp_path)
  before = _tree(w)
  with workdir_guard.WorkdirLock(str(w)):
    code, _, err = run_tiny_cli(data_cache, f"--workdir={w}", "--config.train.steps=15")
  assert code == 2
  line = one_error_line(err)
  assert f"in use by another run (pid {os.getpid()})" in line
  assert _tree(w) == before
  # readers take no lock: eval works while a writer holds it
  with workdir_guard.WorkdirLock(str(w)):
    assert checkpointing.restore_for_inference(str(w))[0].model.num_layers == 2


def test_the_lock_goes_with_its_process_even_on_kill_9(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, sys.argv[1]); from gptjax.training import workdir_guard; "
      "workdir_guard.WorkdirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"),
      str(REPO), str(w)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
    workdir_guard.WorkdirLock(str(w)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  with workdir_guard.WorkdirLock(str(w)):
    assert (w / ".lock").read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------ 8. eval paths
def test_eval_takes_data_paths_and_overrides_from_the_command_line(trained, tmp_path, data_cache):
  w = _copy(trained, tmp_path)
  stored = tmp_path / "stored_tfds"  # a path the checkpoint names, as if trained elsewhere
  meta_file = w / "checkpoints" / "10" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  saved = json.loads(meta["config"])
  saved["data"]["tfds_data_dir"] = str(stored)
  meta["config"] = json.dumps(saved)
  meta_file.write_text(json.dumps(meta))
  merged = resume_check.eval_config(checkpointing.config_from_meta(meta),
                                    load_config("gpt", "tiny", **{"data.seq_len": 16}), None)
  assert merged.data.tfds_data_dir == "" and merged.data.seq_len == 32  # not given as a flag
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["run.py", f"--config={REPO / 'configs' / 'gpt.py'}:tiny", "--config.data.seq_len=16"]
  flag_values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  merged = resume_check.eval_config(checkpointing.config_from_meta(meta), flag_values.config,
                                    flag_values)
  assert merged.data.seq_len == 16 and merged.model.num_layers == 2
  code, out, err = run_tiny_cli(data_cache, f"--workdir={w}", "--mode=eval", "--config.data.seq_len=16",
                        "--config.train.eval_steps=2")
  assert code == 0, err[-2000:]
  assert out.startswith("float32: ") and not stored.exists()
  assert "WARNING" not in err and "W11" not in err  # no orbax lines


# ------------------------------------------------------------------ quiet runs
def test_first_use_of_a_corpus_prints_one_gptjax_line(tmp_path):
  code, out, err = run_tiny_cli(tmp_path / "fresh_cache", "--mode=data")
  assert code == 0, err[-2000:]
  assert "Downloading and preparing" not in out and "preparing corpus 'tiny_shakespeare'" in out


def test_training_and_generate_print_no_library_warnings(trained, data_cache):
  _, out, err = trained
  assert "Downloading and preparing" not in out
  assert not [l for l in (out + err).splitlines() if l.startswith(("W11", "I11", "WARNING"))]
  code, out, err = run_tiny_cli(data_cache, f"--workdir={trained[0]}", "--mode=generate",
                        "--prompt=ROMEO:", "--config.generate.max_new_tokens=4")
  assert code == 0 and out.startswith("ROMEO:") and err == "", err


def test_icl_reports_prompts_cut_to_the_context(trained):
  from gptjax.inference import icl  # pylint: disable=g-import-not-at-top
  from gptjax.model import models
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = checkpointing.restore_for_inference(str(trained[0]))
  model = models.make_model(ModelConfig.from_config(config.model))
  raw = str(REPO.parent / "shared" / "data")
  dev, demos = icl.read_sst2("dev", raw)[:4], icl.read_sst2("train", raw)[:200]
  result = icl.evaluate_icl(model, params, tokenizer, dev, demos, [0, 50], batch_size=8)
  assert result["cut@50"] == 1.0  # 50 demonstrations never fit 64 tokens
  assert result["cut@0"] < 1.0
