"""One partitioned copy stage on a prepared run folder, as a driver the fault tests SIGKILL.

    python _copy_scale_work.py {copydetect,decontam} RUN OUT --address ADDR

copydetect: stages.copy.run_copydetect(RUN, partitioned=True) with RUN/proposer as proposer,
decontam: stages.decontam.run_decontam(RUN, RUN/eval/*, partitioned=True, proposer "vectors").
Small parts (tests/curation/test_copy_scale_faults.py) so each stage runs several task waves.
OUT/<stage>.started is written when the stage starts and OUT/<stage>.done when it returned,
so the test knows where the driver is; prints RESULT {"seconds": wall}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from lvd.curation.copydetect import CopyDetectConfig  # noqa: E402
from lvd.curation.scale.copyscale import CopyScaleConfig  # noqa: E402

# as tests/curation/test_scale_copy.py (33 images: 7 ranges of 5, 3 groups / partitions)
COPY_CFG = CopyDetectConfig(k=8, max_verify=6, max_remove=0.95, calib_images=8, calib_copy_images=2)
COPY_SCALE = CopyScaleConfig(part_rows=5, lsh_buckets=3, groups=3, partitions=3)
# as tests/curation/test_decontam_scale.py (its pool in ingest parts of 6 files), 3 index buckets
DECONTAM_CFG = CopyDetectConfig(k=2, max_remove=0.95, calib_images=12, calib_copy_images=6)
DECONTAM_BUCKETS = 3
SCRATCH = {"copydetect": "copydetect/scale", "decontam": "decontam/work"}  # the stages' wave outputs
OUTPUT = {"copydetect": "copydetect/duplicates.parquet", "decontam": "decontam/decontaminated.parquet"}
ATTEMPTS = 3  # runs of the stage until a node is removed while it runs (with_node_removal)


def copydetect(run: Path) -> None:
    from lvd.curation.stages import copy as stages_copy

    stages_copy.run_copydetect(run, COPY_CFG, proposers=[run / "proposer"], partitioned=True, scale=COPY_SCALE)


def decontam(run: Path) -> None:
    from lvd.curation.stages import decontam as stage

    evals = {d.name: d for d in sorted((run / "eval").iterdir())}
    stage.run_decontam(run, evals, DECONTAM_CFG, proposer="vectors", partitioned=True, buckets=DECONTAM_BUCKETS)


def with_node_removal(stage: str, run: Path, out: Path) -> dict:
    """On a Cluster (head without CPUs, 3 worker nodes of 1 CPU): the stage on a copy of RUN
    (OUT/reference), then on RUN with one worker node removed (and a fresh one added) once the
    stage's first waves wrote scratch. The stage runs in a thread: Ray adds nodes from the main
    thread only. -> {"removed": whether the node went while the stage ran, "seconds": ...,
    "attempts": runs of the stage until it did}."""
    import shutil
    import threading

    import ray
    from ray.cluster_utils import Cluster

    fn = {"copydetect": copydetect, "decontam": decontam}[stage]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        ref = out / "reference"
        shutil.copytree(run, ref)
        t0 = time.time()
        fn(ref)
        t_ref = time.time() - t0
        pristine = out / "pristine"
        shutil.copytree(run, pristine)
        # A stage of a few seconds can end before the watcher sees one of its tasks on a node
        # (the state API answers in ~0.1-1 s): then RUN goes back to its state before the stage
        # and the stage runs again, at most ATTEMPTS times.
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:
                shutil.rmtree(run)
                shutil.copytree(pristine, run)
            failed: list[BaseException] = []
            worker = threading.Thread(target=_catch, args=(fn, run, failed))
            worker.start()
            scratch, removed = run / SCRATCH[stage], False
            killed: list[str] = []
            while worker.is_alive():
                if scratch.exists() and len([p for p in scratch.rglob("*") if p.is_file()]) >= 2:
                    busy = _running(nodes)  # a node running one of the stage's tasks now
                    if busy is not None:
                        node, killed = busy
                        nodes.remove(node)
                        cluster.remove_node(node)  # its tasks die with it
                        removed = not (run / OUTPUT[stage]).exists()
                        nodes.append(cluster.add_node(num_cpus=1))
                        break
                time.sleep(0.01)
            worker.join()
            if failed:
                raise failed[0]
            if removed:
                break
        return {"removed": removed, "killed_tasks": killed, "seconds_reference": t_ref, "attempts": attempt}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _running(nodes: list) -> tuple[object, list[str]] | None:
    """(a worker node, the names of the tasks it runs now), or None when none runs one."""
    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("state", "=", "RUNNING")], raise_on_missing_output=False)
    for node in nodes:
        names = [t.name for t in tasks if t.node_id == node.node_id]
        if names:
            return node, names
    return None


def _catch(fn, run: Path, failed: list) -> None:
    try:
        fn(run)
    except BaseException as e:  # re-raised by the main thread
        failed.append(e)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=("copydetect", "decontam"))
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--address", default=None)
    p.add_argument("--cluster-removal", action="store_true", help="a Cluster losing a worker node mid-stage")
    args = p.parse_args()
    if args.cluster_removal:
        print("RESULT " + json.dumps(with_node_removal(args.stage, args.run, args.out)), flush=True)
        return
    from lvd.curation import runner

    runner.init_ray(args.address)  # as `lvd curate --ray-address` joins
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stage}.started").touch()
    t0 = time.time()
    {"copydetect": copydetect, "decontam": decontam}[args.stage](args.run)
    wall = time.time() - t0
    (args.out / f"{args.stage}.done").touch()
    print("RESULT " + json.dumps({"seconds": wall}), flush=True)


if __name__ == "__main__":
    main()
