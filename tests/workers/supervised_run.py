"""Run one supervised job (used by test_supervisor): argv = run_dir, json list of faults,
json list of --set overrides, and optionally "elastic" to run on a 2-node local cluster and
remove the second node after step 3."""

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
elastic = len(sys.argv) > 4 and sys.argv[4] == "elastic"
cfg = load_config("examples/tiny.toml", sets)
cfg.train.run_dir = run_dir
workers = 2
if elastic:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    second = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="ERROR")
    workers = 4

    def remove_second_node() -> None:
        metrics = Path(run_dir) / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        cluster.remove_node(second)

    threading.Thread(target=remove_second_node, daemon=True).start()
try:
    summary = Supervisor(cfg, workers=workers, faults=faults).run()
    print("SUMMARY " + json.dumps(summary), flush=True)
except JobFailed as e:
    print("JOBFAILED " + json.dumps(str(e)), flush=True)
finally:
    import ray

    ray.shutdown()
    if elastic:
        cluster.shutdown()
