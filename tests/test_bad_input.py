"""Issue 17: every bad value or broken input is one line (exit 2) before anything compiles.

Each test runs the command (or the call run.py makes), then checks the exit code or ConfigError,
the one line, and the files left on disk.
"""

import os
import pathlib
import socket

import pytest

from conftest import REPO, load_config, one_error_line, run_tiny_cli
from gptjax import config_schema
from gptjax.data import corpora
from gptjax.training import train
from gptjax.config_schema import ConfigError

TINY = {"train.log_every": 1, "train.eval_every": 0, "train.progress": False,
        "train.ckpt_every": 5, "train.steps": 10}


# ------------------------------------------------------------------ 4. numbers
@pytest.mark.parametrize("override,needle", [
    ({"train.learning_rate": -0.01}, "config.train.learning_rate=-0.01"),
    ({"train.learning_rate": float("nan")}, "config.train.learning_rate=nan"),
    ({"data.batch_size": 0}, "config.data.batch_size=0"),
    ({"data.eval_batch_size": 0}, "config.data.eval_batch_size=0"),
    ({"train.log_every": 0}, "config.train.log_every=0"),
    ({"train.ckpt_every": 0}, "config.train.ckpt_every=0"),
    ({"quantize": "int4"}, "config.quantize='int4' is not supported"),
    ({"train.optimizer": "sgd"}, "config.train.optimizer='sgd'"),
])
def test_bad_numbers_are_one_line_at_start_up(override, needle):
  with pytest.raises(ConfigError) as e:
    config_schema.validate(load_config("gpt", "tiny", **override))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_nan_learning_rate_exits_2_before_compiling(tmp_path, data_cache):
  code, out, err = run_tiny_cli(data_cache, f"--workdir={tmp_path / 'w'}", "--config.train.learning_rate=nan")
  assert code == 2 and "config.train.learning_rate=nan" in one_error_line(err)
  assert not (tmp_path / "w").exists() and "step" not in out


# ------------------------------------------------------------------ 7, 10. text files
def test_one_long_document_is_split_by_characters_not_reused(tmp_path):
  text = (REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()
  flat = tmp_path / "flat.txt"
  flat.write_text(" ".join(text.split()))  # no newlines: one document
  train_docs = corpora.load_documents("text_files", "train", "", str(flat))
  val_docs = corpora.load_documents("text_files", "validation", "", str(flat))
  assert len(train_docs) == len(val_docs) == 1
  t, v = train_docs[0]["text"], val_docs[0]["text"]
  assert v not in t and 0.04 < len(v) / (len(t) + len(v)) < 0.06
  assert (t + " " + v).split() == " ".join(text.split()).split()
  few = tmp_path / "few.txt"  # three documents: the others stay whole, none is reused
  few.write_text("\n\n".join(text.split("\n\n")[:3]))
  train_docs = corpora.load_documents("text_files", "train", "", str(few))
  val_docs = corpora.load_documents("text_files", "validation", "", str(few))
  assert len(train_docs) == 3 and len(val_docs) == 1
  assert not any(val_docs[0]["text"] in d["text"] for d in train_docs)


@pytest.mark.parametrize("lines,needle", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], ":2 is not valid JSON"),
    (['{"text": "a"}', '{"body": "b"}'], ":2 has no string 'text' field"),
])
def test_broken_jsonl_names_the_file_and_line(tmp_path, lines, needle):
  f = tmp_path / "d.jsonl"
  f.write_text("\n".join(lines) + "\n")
  with pytest.raises(ConfigError) as e:
    corpora.load_documents("text_files", "train", "", str(f))
  assert str(f) + needle in str(e.value) and "\n" not in str(e.value)


def test_broken_jsonl_through_the_cli_is_one_line(tmp_path, data_cache):
  f = tmp_path / "d.jsonl"
  f.write_text('{"text": "one"}\n{"text": \n')
  code, _, err = run_tiny_cli(data_cache, f"--workdir={tmp_path / 'w'}", "--config.data.corpus=text_files",
                      f"--config.data.text_files={f}")
  assert code == 2 and f"{f}:2 is not valid JSON" in one_error_line(err)


# ------------------------------------------------------------------ 9. offline
def test_offline_tfds_name_fails_in_one_line_without_the_network(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f"network touched: {args}")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setenv("GPTJAX_OFFLINE", "1")
  config = load_config("gpt", "tiny", **{"data.corpus": "mnist",
                                         "data.tfds_data_dir": str(tmp_path / "tfds")})
  with pytest.raises(ConfigError) as e:
    corpora.data_source(config, "train")
  assert "GPTJAX_OFFLINE=1" in str(e.value) and "'mnist' is not prepared" in str(e.value)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------ tracebacks -> one line
def test_embed_without_a_model_is_one_line(tmp_path, data_cache):
  f = tmp_path / "s.txt"
  f.write_text("a sentence\n")
  code, _, err = run_tiny_cli(data_cache, "--mode=embed", f"--input_file={f}")
  assert code == 2 and "--mode=embed needs config.init_from" in one_error_line(err)


def test_workdir_that_is_a_file_or_under_one_is_one_line(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  for w, needle in ((f, "is a file"), (f / "sub", "which is a file")):
    with pytest.raises(ConfigError, match=needle) as e:
      train.train_and_evaluate(load_config("gpt", "tiny", **TINY), str(w))
    assert "\n" not in str(e.value)
  assert f.read_text() == "x"


def test_read_only_workdir_is_one_line(tmp_path):
  if os.geteuid() == 0:  # root writes through file modes; /proc/self is read-only even for root
    w = pathlib.Path("/proc/self")
  else:
    w = tmp_path / "ro"
    w.mkdir()
    w.chmod(0o555)
  with pytest.raises(ConfigError, match="is not writable"):
    train.train_and_evaluate(load_config("gpt", "tiny", **TINY), str(w))


def test_mistyped_field_names_the_full_path(data_cache):
  code, _, err = run_tiny_cli(data_cache, "--mode=summary", "--config.model.nmu_layers=4")
  line = one_error_line(err)
  assert code == 2
  assert line == ("error: bad flag: --config.model.nmu_layers is not a config field; did you mean "
                  "config.model.num_layers?")


def test_empty_prompts_file_says_so(tmp_path):
  from gptjax.inference import generate as generate_cli  # pylint: disable=g-import-not-at-top
  f = tmp_path / "p.txt"
  f.write_text("\n  \n")
  flags = type("F", (), {"prompt": None, "prompts_file": str(f)})()
  with pytest.raises(ConfigError, match="has no non-blank line"):
    generate_cli.read_prompts(flags)


def test_one_cache_variable(monkeypatch, tmp_path):
  monkeypatch.delenv("GPTJAX_CACHE", raising=False)
  monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "old"))
  assert config_schema.cache_dir() == str(tmp_path / "old")
  monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "new"))
  assert config_schema.cache_dir() == str(tmp_path / "new")
  assert corpora.tfds_dir() == str(tmp_path / "new" / "tfds")
  from gptjax.backends.xla_cpu import build  # pylint: disable=g-import-not-at-top
  assert str(build.cache_dir()) == str(tmp_path / "new")
