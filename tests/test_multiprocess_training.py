"""Two real processes on loopback form one mesh and train like one process does, and
restore one checkpoint step together.

Each process has 2 simulated CPU devices; the 2 x 2 mesh puts 'data' across the processes
(each loads only its half of every global batch via per_host_batch_slice + shard_batch)
and 'model' within each, with FSDP on, so gradients, parameter shards and metrics all
cross the process boundary through the gloo collectives.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from process_group import cpu_env, free_port, read_json, run_together

pytestmark = pytest.mark.slow  # end-to-end runs of minutes; `make test-fast` skips them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
TIMEOUT_S = 240


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  outputs = [str(tmp_path / f"process_{i}.json") for i in range(2)]
  reference_out = str(tmp_path / "single.json")
  # Two processes of 2 devices each, and the single-process reference: the same 2 x 2 mesh
  # on 4 local devices, same batches.
  run_together([[WORKER, str(i), "2", str(port), outputs[i], "2", "2"] for i in range(2)]
               + [[WORKER, "-1", "1", "0", reference_out, "2", "2"]],
               [cpu_env(2), cpu_env(2), cpu_env(4)], TIMEOUT_S)
  results = read_json(outputs)
  reference, = read_json([reference_out])
  for index, result in enumerate(results):
    assert result["process_index"] == index and result["process_count"] == 2
    assert result["global_devices"] == 4 and result["local_devices"] == 2
    assert result["step"] == 3
  # Each process loaded only its own half of the global batch of 8.
  assert results[0]["rows"] == [0, 4] and results[1]["rows"] == [4, 8]
  assert reference["rows"] == [0, 8] and reference["process_count"] == 1
  # Both processes report the same (replicated) losses, equal to the single-process run.
  np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0, atol=0)
  np.testing.assert_allclose(results[0]["losses"], reference["losses"], rtol=1e-5)
  assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_two_processes_restore_one_step_past_a_corrupt_and_a_one_host_failure(tmp_path):
  """Newest checkpoint (3) corrupt on disk, the next (2) failing on process 1 only: both
  processes restore step 1, and process 0 moves 2 and 3 aside. Restoring per host would
  leave process 0 on step 2 and process 1 on step 1 (and each waiting at its own barrier)."""
  port = free_port()
  directory = str(tmp_path / "checkpoints")
  outputs = [str(tmp_path / f"restore_{i}.json") for i in range(2)]
  logs = run_together([[WORKER, "restore", str(i), "2", str(port), outputs[i], directory]
                       for i in range(2)], [cpu_env(2)] * 2, 120)
  results = read_json(outputs)
  for result in results:
    assert result["step"] == 1 and result["data_position"] == {"examples_consumed": 8}
    assert result["local_values"] == [1.0, 1.0]  # this host's shards, of step 1
    assert result["skipped"] == [3, 2] and result["steps_after"] == [1]
    assert [name.split("-")[0] for name in result["corrupt"]] == ["2", "3"]
  assert "restored here but not on process(es) [1]" in logs[0]
