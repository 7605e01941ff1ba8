"""Mesh (data, fsdp, tensor), pmap and 2-process runs give the same losses on the same batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "parity_steps.py"


def _run(mode: str, devices: int, *extra: str, timeout=240) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(SCRIPT), mode, *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference():
  return _result(_run("mesh", 4))


def test_reference_run_uses_four_devices_and_learns(reference):
  assert reference["devices"] == 4
  assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.parametrize("mode", ["pmap", "fsdp"])
def test_pmap_and_fsdp_tensor_match_data_parallel(reference, mode):
  got = _result(_run(mode, 4))
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=2e-5)
  np.testing.assert_allclose(got["param_sq_norm"], reference["param_sq_norm"], rtol=1e-6)


def test_two_processes_match_one_process(reference):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  procs = [_run("multihost", 2, str(i), port) for i in range(2)]
  results = [_result(p) for p in procs]
  for got in results:
    assert got["devices"] == 4
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=2e-5)
