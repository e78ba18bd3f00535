"""One process of a 2-process train, evaluate, infer and export run (started by
tests/test_multihost_outputs.py).

  python tests/multihost_outputs_worker.py PROCESS_ID NUM_PROCESSES PORT ARGS_JSON OUT_JSON

Joins the loopback cluster the way every CLI does (gensar_jax.distributed, between gin and
main), then runs the real `train` (with the ranking eval hook), `evaluate`, `infer` and
`export` entry points under the gin flags of ARGS_JSON, and writes what each process got
back to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import sys


def main(process_id: int, num_processes: int, port: int, args_path: str,
         out_path: str) -> None:
  from gensar_jax import distributed
  distributed.initialize_distributed(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                                     num_processes=num_processes, process_id=process_id,
                                     initialization_timeout_s=60)
  # After initialize: task_world's imports run a JAX computation, fixing the backend.
  import jax
  from gensar_jax import evaluate as evaluate_lib
  from gensar_jax import export as export_lib
  from gensar_jax import infer as infer_lib
  from gensar_jax import train as train_lib
  from task_world import under_gin
  with open(args_path, encoding="utf-8") as f:
    argv = json.load(f)
  summary = under_gin(argv, train_lib.train)
  evaluated = under_gin(argv, evaluate_lib.evaluate)
  inferred = under_gin(argv, infer_lib.infer)
  exported = under_gin(argv, export_lib.export)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "eval_metrics": summary.eval_metrics, "evaluate": evaluated,
            "infer_examples": inferred.num_examples, "export_dir": exported}
  with open(out_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f)
  os.replace(out_path + ".tmp", out_path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if len(sys.argv) != 6:
    raise SystemExit(__doc__)
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
