"""Run a stage on a `ray.cluster_utils.Cluster` whose only worker node is removed after the
stage's first finished unit (and replaced), in a subprocess: the session's local Ray can't
lose a node. The head has no CPUs, so all stage work runs on the worker node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HARNESS = textwrap.dedent(
    """
    import json
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    seen = {}

    def remove_worker_after_first(done, total):
        if done >= 1 and "removed" not in seen:
            seen["removed"] = (done, total)
            cluster.remove_node(worker)   # in-flight tasks / actors die with the node
            cluster.add_node(num_cpus=2)  # replacement capacity for the retries / restarts
            cluster.wait_for_nodes()

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        result = work(remove_worker_after_first)
        print("RESULT " + json.dumps({**result, "removed_at": seen["removed"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def run_with_node_removal(work_source: str, *args: str, timeout: float) -> dict:
    """`work_source` defines `work(progress) -> dict` (reading `sys.argv[1:]` = `args`) and
    passes `progress` to the stage; returns its dict plus `removed_at` = (done, total)."""
    script = textwrap.dedent(work_source) + HARNESS
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    return json.loads(lines[0][len("RESULT ") :])
