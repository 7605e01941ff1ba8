"""The Trainer's methods one at a time, the objective specs it reads, and the MFU peak table."""

import json
import types

import jax
import numpy as np
import pytest

from conftest import load_config
from gptjax.training import checkpointing, objectives, peak_flops, train, trainer

TINY = {"train.log_every": 1, "train.eval_every": 0, "train.progress": False, "train.steps": 3,
        "train.eval_steps": 2}


def test_step_drain_log_evaluate_save_and_the_nan_stop(tmp_path, data_cache):
  del data_cache
  config = load_config("gpt", "tiny", **TINY)
  run = train.build_run(config, str(tmp_path))
  t = trainer.Trainer(run)
  try:
    batch = next(t.train_iter)
    with jax.set_mesh(run.mesh):
      t.pending = (1, t.step(batch), True)
      t.drain()
    assert t.pending is None
    # next_token's spec counts lm_loss's tokens: every weighted target of the batch
    assert t.loss_tokens == pytest.approx(float(np.sum(batch["weights"])))
    record = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
    assert record["step"] == 1 and np.isfinite(record["loss"]) and record["mfu"] > 0
    assert record["peak_source"] == "measured" and record["peak_flops"] == t.peak.flops
    # the Trainer's eval (its compiled step, cached batches, mesh placement) is evaluate_params'
    with jax.set_mesh(run.mesh):
      ours = t.evaluate()
    plain = trainer.evaluate_params(config, jax.device_get(t.host_state().params), run.tokenizer,
                                    max_batches=config.train.eval_steps)
    assert sorted(ours) == sorted(f"eval_{k}" for k in plain)
    for k, v in plain.items():
      assert ours[f"eval_{k}"] == pytest.approx(v, rel=1e-5)
    t.save(1, ours)
    with jax.set_mesh(run.mesh):  # a non-finite loss stops the run at the drain
      metrics = t.step(next(t.train_iter))
    t.pending = (2, dict(metrics, loss=metrics["loss"] * np.nan), False)
    with pytest.raises(trainer.NonFiniteLoss, match="loss is nan at step 2.*step 1"):
      t.drain()
  finally:
    t.close()
  assert checkpointing.Checkpointer(str(tmp_path), read_only=True, async_save=False).steps() == [1]


def test_every_objective_has_a_spec_whose_token_terms_are_its_loss_terms():
  assert set(objectives.SPECS) == set(objectives.OBJECTIVES)
  for name, spec in objectives.SPECS.items():
    assert all(term.endswith("_loss") for term in spec.token_terms), name
  assert objectives.SPECS["dpo"].sequences_per_row == 2
  assert [n for n, s in objectives.SPECS.items() if s.unigram_baseline] == ["next_token"]


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989), ("NVIDIA H200", "bfloat16", 989),
    ("NVIDIA H100 PCIe", "bfloat16", 756), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
    ("NVIDIA A100-SXM4-40GB", "float32", 156), ("NVIDIA L4", "bfloat16", 121),
    ("NVIDIA L40S", "bfloat16", 362), ("TPU v4", "bfloat16", 275),
    ("TPU v5 lite", "bfloat16", 197), ("TPU v5", "bfloat16", 459), ("TPU v5p", "bfloat16", 459),
    ("TPU v6 lite", "bfloat16", 918),
    ("TPU v4", "float32", None), ("NVIDIA A10G", "bfloat16", None), ("NVIDIA L40", "bfloat16", None),
    ("Tesla V100-SXM2-16GB", "bfloat16", None), ("cpu", "float32", None),
])
def test_nominal_peak_table(kind, dtype, tflops):
  got = peak_flops.nominal_peak(kind, dtype)
  assert got == (None if tflops is None else tflops * 1e12)


def test_peak_is_nominal_on_a_known_accelerator_and_measured_elsewhere():
  h200 = types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu")
  nominal = peak_flops.Peak("bfloat16", device=h200)
  assert nominal.fields() == {"peak_flops": 989e12 * jax.device_count(),
                              "peak_source": "nominal:NVIDIA H200"}
  assert not nominal.refresh_due()
  unknown = types.SimpleNamespace(device_kind="NVIDIA A10G", platform="gpu")
  rates = iter([2e9, 5e9, 3e9])
  measured = peak_flops.Peak("bfloat16", device=unknown, measure=lambda dtype: next(rates),
                             refresh_seconds=0.0)
  assert measured.fields() == {"peak_flops": 2e9 * jax.process_count(), "peak_source": "measured"}
  assert measured.refresh_due()
  measured.refresh()
  measured.refresh()
  assert measured.flops == 5e9 * jax.process_count()  # the highest rate seen so far


def test_measured_cpu_peak_is_a_real_matmul_rate():
  rate = peak_flops.measure_matmul_rate("float32", n=256, repeats=2)
  assert 1e6 < rate < 1e15


def test_a_second_run_in_the_process_reuses_a_fresh_measured_peak():
  cpu = types.SimpleNamespace(device_kind="cpu", platform="cpu")
  first = peak_flops.Peak("float32", device=cpu)
  second = peak_flops.Peak("float32", device=cpu)
  assert second.fields() == first.fields() and second.fields()["peak_flops"] > 0
  assert second._measured_at == first._measured_at  # pylint: disable=protected-access
  later = peak_flops.Peak("float32", device=cpu, refresh_seconds=0.0)  # too old: timed again
  assert later._measured_at > first._measured_at  # pylint: disable=protected-access
  assert later.flops >= first.flops  # the best rate of the process so far


def test_checkpoints_with_removed_or_older_config_fields_still_resume():
  from gptjax import config_schema  # pylint: disable=import-outside-toplevel
  from gptjax.training import resume_check  # pylint: disable=import-outside-toplevel
  saved = json.loads(config_schema.base_config().to_json_best_effort())
  saved["data"].update(pack=True, num_workers=4)  # fields an older gptjax wrote
  assert resume_check.config_changes(json.dumps(saved), config_schema.base_config()) == ({}, {})
  saved["data"]["seq_len"] = 7
  unsafe, _ = resume_check.config_changes(json.dumps(saved), config_schema.base_config())
  assert list(unsafe) == ["data.seq_len"]
  saved["data"]["seq_len"] = config_schema.base_config().data.seq_len
  del saved["train"]["optimizer"]  # saved before train.optimizer existed
  assert resume_check.config_changes(json.dumps(saved), config_schema.base_config()) == ({}, {})
  requested = config_schema.base_config()
  requested.train.optimizer = "adafactor"
  unsafe, _ = resume_check.config_changes(json.dumps(saved), requested)
  assert unsafe == {"train.optimizer": ["adamw", "adafactor"]}
  # read back for inference or analysis, such a config has the value the run used
  from gptjax.training import checkpointing  # pylint: disable=import-outside-toplevel
  restored = checkpointing.config_from_meta({"config": json.dumps(saved)})
  assert restored.train.optimizer == "adamw"
