"""Run one supervised job (used by test_supervisor): argv = run_dir, json list of faults,
json list of --set overrides, and optionally "elastic" to run on a 2-node local cluster and
remove the second node after step 3, or "elastic-grow" to also add a node back once the
shrunk job has resumed."""

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every Ray address on loopback

from suanli.infra.cluster.supervisor import JobFailed, Supervisor  # noqa: E402
from suanli.infra.config import load_config  # noqa: E402

run_dir, faults, sets = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else ""
elastic = mode.startswith("elastic")
cfg = load_config("examples/tiny.toml", sets)
cfg.train.run_dir = run_dir


def supervise(workers: int) -> None:
    try:
        summary = Supervisor(cfg, workers=workers, faults=faults).run()
        print("SUMMARY " + json.dumps(summary), flush=True)
    except JobFailed as e:
        print("JOBFAILED " + json.dumps(str(e)), flush=True)


if not elastic:
    try:
        supervise(2)
    finally:
        import ray

        ray.shutdown()
    sys.exit(0)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

# Ray changes nodes only from the main thread (signal handlers), so here the supervisor
# runs on a thread and the main thread plays the cluster operator.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=2)
second = cluster.add_node(num_cpus=2)
ray.init(address=cluster.address, logging_level="ERROR")
job = threading.Thread(target=supervise, args=(4,))
job.start()
try:
    metrics, events = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "events.jsonl"
    while job.is_alive() and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    cluster.remove_node(second)
    if mode == "elastic-grow":
        while job.is_alive() and '"recovered"' not in events.read_text():
            time.sleep(0.2)
        cluster.add_node(num_cpus=2)
    job.join()
finally:
    ray.shutdown()
    cluster.shutdown()
