"""A memory budget per worker, and the partition sizes that follow from it by construction.

One knob, `--worker-memory` (say `4GiB`): the most resident memory one Ray worker process of a
partitioned global stage may take. Every partition size is derived from it, never chosen by
hand, so a bigger pool means more partitions (more tasks, more actors), never bigger ones:

    data_bytes(B)          = (B - WORKER_BASE_BYTES) * FILL       bytes a worker may give to partition data
    vector_shard_rows      = data_bytes / vector_row_bytes(D, index)     rows of vectors that fit the data share
    knn_shard_rows         = (data_bytes - knn_shard_fixed_bytes) / vector_row_bytes(D, index)   rows per k-NN shard
    knn_shard_fixed_bytes  = Q * (4*D + 24*(k+16)) + nlist*D*4 [+ 256*D*4 PQ] + uids * KNN_UID_BYTES
    kmeans_shard_rows      = (data_bytes - 20*k*D - block_rows*(4k + 14D)) / (2*D + 8)      rows per k-means actor
    hash_bucket_count(N)   = ceil(N * EXACT_RECORD_BYTES / data_bytes)    buckets of the hash dedup's exact pass
    hash_block_count(N)    = ceil(N * PAIR_RECORD_BYTES / data_bytes)     blocks of its pair pass
    hash_shuffle_sizes(N)  = (hash_bucket_count(N), hash_block_count(N))   independent: blocks slice the whole pool
    query_block_rows       = data_bytes / 4 / (4*D + 24*k)            queries searched at once
    ivf_train_rows         = data_bytes / (3 * 4*D)                   the IVF quantiser's training sample in the
                             driver (float32, its unit copy, Faiss's k-means copy); past it `shardindex.sized`
                             lowers the points per list (not under 39) and then the lists
    ingest_partition_cap   = data_bytes / (2 * mean input bytes)      files per ingest partition at most
    ledger_range_rows      = data_bytes / LEDGER_ROW_BYTES            uids per ledger / verify range task
    shard_plan_range_rows  = data_bytes / SHARD_PLAN_ROW_BYTES        records per shard-plan range task
    order_records          = data_bytes / ORDER_RECORD_BYTES          records per poolorder bucket / range task
    cluster_task_images    = (B - WORKER_BASE_BYTES) / CLUSTER_TASK_IMAGE_BYTES   most candidates the cluster stage's
                             one task holds (past it the flow partitions the stage: scale.pcluster, order_records a task)
    retrieve_task_images   = (B - WORKER_BASE_BYTES) / RETRIEVE_TASK_IMAGE_BYTES  most candidates the retrieve stage's
                             one task holds (past it the stage is partitioned: scale.pretrieve, or scale.pseeds with seeds)
    component_partitions(E) = ceil(2 * E * 2 * EDGE_ROW_BYTES * SKEW / data_bytes)   node partitions of the components
    actor_memory(held)     = min(B, WORKER_BASE_BYTES + held / FILL)   Ray `memory=` of an actor holding `held` bytes

WORKER_BASE_BYTES is what an idle Ray worker takes before it holds any data (measured: 145 MB
resident with numpy, pyarrow and faiss imported; 256 MiB kept). FILL = 0.5 leaves the other half
of the rest for the temporaries of a partition's work (an Arrow column turned into numpy, a sort
buffer, faiss's search blocks), so the peak stays under B when the rows fit the data bytes.

The driver never holds partition data: it plans partitions, passes paths and reduces small
results (k-means partial sums are k*D floats, kNN merges one query block at a time), so its
peak does not grow with N (benchmarks/curate_scale.py measures both).

Ray must not put more workers on a node than their budgets fit: `ray_options(budget)` gives
the `memory=` resource to pass to `.remote`/`.options` of every task and actor of these
stages (Ray then schedules at most node memory / B of them per node). An actor that knows what
it will hold asks for `actor_memory(held)` instead (a k-NN shard: its rows and fixed bytes; a
k-means actor: its shard and fixed bytes): a full partition asks for exactly B, a smaller one
for less, so Ray packs as many as their sizes allow and no more.

Stages that run inside a Ray task (copy detection's and decontamination's k-NN, the cluster
stage's k-means) learn the flow's budget from `current()`: `job_budget(b)` sets it for this
process and, through Ray's GCS key-value store keyed by the job id, for every task and actor of
the same Ray job (the flow's tasks set it around those stages; lvd/flows/curate_tasks.py).

Sizing a cluster for a pool of N images with D-dimensional vectors (`cluster_size`):

    pool bytes   = N * vector_row_bytes(D, index)      (+ N * HASH_RECORD_BYTES for the hash stage)
    workers      = ceil(pool bytes / data_bytes(B))     the vector shards that must be resident at once
    per node     = min(cores, floor(node RAM * 0.9 / B))
    nodes        = ceil(workers / per node)
    hours        = sum over stages of N * CPU s per row / (nodes * per node * 3600)
                   + N / (GPUs * images per second per GPU) / 3600      (embedding)

Usage by a stage (all pure functions, no Ray needed to call them):

    b = WorkerBudget(parse_bytes("4GiB"))
    rows = vector_shard_rows(b, dim=1024, index="ivf")      # rows per shard actor
    buckets = hash_bucket_count(n_records, b)                # buckets of the hash shuffle
    block = query_block_rows(b, dim=1024, k=64)
    Actor.options(**ray_options(b)).remote(...)
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
WORKER_BASE_BYTES = 256 * MiB  # an idle Ray worker with numpy, pyarrow, faiss: 145 MB measured
FILL = 0.5  # share of (budget - base) given to partition data; the rest is for temporaries
# One hash record of the dedup shuffle in memory: uid (64 hex + offset), width, height, phash,
# dhash (8 each), phash256, nphash256 (32 each), cphash256 (7 x 32: ingest's CLIP_FACTORS),
# sat16 (64), thumb16 (256), a bucket key and row id (16). (It said 4 x 32 until 10^7 was measured.)
HASH_RECORD_BYTES = 68 + 4 * 8 + 2 * 32 + 7 * 32 + 64 + 256 + 16
# Bytes per record of an exact-pass reduce task's bucket at its peak, over the idle worker
# (scale.hashdedup._exact_reduce: the bucket's parts concatenated and sorted, one row per uid,
# the compared bytes and their sorted unique copy, the representatives reordered by aspect),
# measured: 10^7 synthetic records in 13 buckets (769,000 each), a worker peaked at 3,626 MiB
# (benchmarks/curate_scale.py "hash dedup sampled", 3 GiB budget): 4.6 KB a record, 1.18x the
# budget, where HASH_RECORD_BYTES x HASH_WORK (1.9 KB) had sized the buckets.
EXACT_RECORD_BYTES = 4600
# Bytes per record of a scale.hashdedup block-pair task's block at its peak (codes and per-chunk
# tables of every searched column, the other block's index, candidates of a query batch, the
# blocks read to verify), measured: 10^6 records in 4 blocks, a worker peaked at 2,201 MiB over
# its ~256 MiB idle base (benchmarks/curate_scale.py, 1 worker): 8.2 KB per record of a block.
PAIR_RECORD_BYTES = 8200
EDGE_ROW_BYTES = 150  # one direction of an edge in the components: two node keys (19 digits + 64-hex uid)
# One uid of the caller's list, held by every shard of a k-NN index built for a subset (each maps
# its own parts' rows of it): 290 B measured at the peak of `shardindex._sorted_wanted` for
# 64-hex uids in an object array (tracemalloc, 2e5 uids), + 67 B of its pickle from the object store.
KNN_UID_BYTES = 360
KNN_EXTRA = 16  # candidates knn_index.search asks Faiss for beyond k (its `_EXTRA`)
LEDGER_ROW_BYTES = 150  # a (uid, source) pair as Python strings (the ledger's 2M-row range: ~300 MB)
# a record of a shard-plan range task (stages.shardplan round 2: Arrow records, joins, sorts):
# 2,398 MiB peak at 5M records (curate_scale.py "shard plan", 10^7, 2 ranges) -> ~450 B
SHARD_PLAN_ROW_BYTES = 460
# a record of a poolorder task (uid, source, part, row, width, height in Arrow; sorts, the join):
# 847 MiB peak at 10^6 records in one uid bucket and one order range (curate_scale.py
# "pool order", 10^6, 2 workers) -> ~620 B over the idle worker
ORDER_RECORD_BYTES = 620
# a candidate image in the cluster stage's one Ray task (its uid, store row, assignment, score and
# clusters-table row; the Lloyd itself runs on actors): the task peaked at 338 MiB at 10^5 and
# 731 MiB at 10^6 (curate_scale.py "cluster task", 2 workers) -> ~460 B an image
CLUSTER_TASK_IMAGE_BYTES = 460
# a candidate image in the retrieve stage's one Ray task (its uid as a Python string, the clusters
# table and tree, balanced sampling's per-cluster lists): the task peaked at 299 MiB at 10^5 and
# 617 MiB at 10^6 (curate_scale.py "retrieve task", 1 worker, after "cluster task") -> ~370 B an image
RETRIEVE_TASK_IMAGE_BYTES = 370
SKEW = 2.0  # a bucket may hold up to twice its share of records (hash chunks are not uniform)
# The one-task hash dedup (`dedup.find_near_duplicates`, every record in one process) peaks at
# HASH_WORK x its records' bytes (curate_tasks.dedup_sizes forces the shuffle above the data
# share). First measured on the key shuffle's chunk-reduce task, which this replaced:
# 3.45 GB for 1.0M shuffled records (3.3 KB each, 2.6 x 628 B / FILL; benchmarks/curate_scale.py,
# 1e5 pool, 5 buckets), where SKEW = 2 let it pass a 3 GiB budget. Its copies, per-chunk
# filters and verification hold several copies of a record at once.
HASH_WORK = 3.0
MAX_QUERY_BLOCK = 65_536
INDEX_KINDS = ("flat", "ivf", "ivfpq")
_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MiB', '1.5G' (decimal), '4e9' or an int -> bytes; a clear error otherwise."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r}: use a number with a unit, e.g. 4GiB, 512MiB, 8G or 2e9")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes in binary units, 3 significant digits: 4.00 GiB."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class WorkerBudget:
    """The most resident memory one worker process may take (bytes), and its data share."""

    worker_bytes: int
    base_bytes: int = WORKER_BASE_BYTES
    fill: float = FILL

    def __post_init__(self) -> None:
        if self.worker_bytes < 2 * self.base_bytes:
            raise ValueError(
                f"worker memory {format_bytes(self.worker_bytes)}: use at least {format_bytes(2 * self.base_bytes)} "
                f"(an idle worker takes {format_bytes(self.base_bytes)} before it holds any data)"
            )
        if not 0 < self.fill <= 1:
            raise ValueError(f"fill={self.fill}: use a fraction in (0, 1]")

    @classmethod
    def parse(cls, text: str | int) -> WorkerBudget:
        return cls(parse_bytes(text))

    @property
    def data_bytes(self) -> int:
        """Bytes of partition data one worker may hold at once."""
        return int((self.worker_bytes - self.base_bytes) * self.fill)


def vector_row_bytes(dim: int, index: str = "flat", *, pq_bytes: int = 0) -> int:
    """Resident bytes per vector row in one shard: the fp16 row read from its part (2*D), the
    float32 copy faiss holds (4*D; `ivfpq`: `pq_bytes` code bytes instead), the int64 id (8),
    and for IVF the list entry's id (8)."""
    if index not in INDEX_KINDS:
        raise ValueError(f"index={index!r}: use one of {', '.join(INDEX_KINDS)}")
    if dim < 1:
        raise ValueError(f"dim={dim}: vectors have at least one dimension")
    if index == "ivfpq":
        if pq_bytes < 1:
            raise ValueError("index='ivfpq' needs pq_bytes (code bytes per vector, e.g. dim // 4)")
        return pq_bytes + 8 + 8  # vectors are added block by block: their fp16 rows never all resident
    return 2 * dim + 4 * dim + 8 + (8 if index == "ivf" else 0)


def vector_shard_rows(budget: WorkerBudget, dim: int, index: str = "flat", *, pq_bytes: int = 0) -> int:
    """Rows of D-dimensional vectors one shard (index actor or k-means actor) may hold."""
    return max(1, budget.data_bytes // vector_row_bytes(dim, index, pq_bytes=pq_bytes))


def shard_count(n_rows: int, budget: WorkerBudget, dim: int, index: str = "flat", *, pq_bytes: int = 0) -> int:
    """Shards (resident at once) that `n_rows` vectors need under `budget`."""
    return max(1, math.ceil(n_rows / vector_shard_rows(budget, dim, index, pq_bytes=pq_bytes)))


def hash_bucket_count(n_records: int, budget: WorkerBudget) -> int:
    """Buckets of the hash dedup's exact pass so that one bucket's reduce task
    (EXACT_RECORD_BYTES per record, measured at its peak) fits a worker's data share."""
    return max(1, math.ceil(n_records * EXACT_RECORD_BYTES / budget.data_bytes))


def hash_block_count(n_records: int, budget: WorkerBudget) -> int:
    """Blocks of the hash dedup's pair pass so that a block-pair task (PAIR_RECORD_BYTES per
    record of its block) fits a worker. More blocks mean more work (each record queries
    (blocks + 1) / 2 block indexes), so this is the fewest that fit, not a parallelism knob."""
    return max(1, math.ceil(n_records * PAIR_RECORD_BYTES / budget.data_bytes))


def hash_shuffle_sizes(n_records: int, budget: WorkerBudget, *, min_buckets: int = 1) -> tuple[int, int]:
    """(exact buckets, blocks) of scale.hashdedup under `budget`: each the fewest that fit, the
    buckets at least `min_buckets`. The two are independent: a block is a slice of the whole
    pool's aspect order, every bucket writing its share of each (`hashdedup.exact_pass`). When
    blocks were cut per bucket (ceil(blocks / buckets) each), 13 buckets and 56 blocks ran as
    13 x 5 = 65 blocks at 10^7 under 3 GiB, and the 32 buckets the measured reduce needs there
    would have run 64 (each block costs work) with 2 aspect slices a bucket."""
    return max(min_buckets, hash_bucket_count(n_records, budget)), hash_block_count(n_records, budget)


def hash_bucket_rows(budget: WorkerBudget, *, record_bytes: int = HASH_RECORD_BYTES) -> int:
    """Hash records one worker may hold (a bucket, a component partition of uids)."""
    return max(1, budget.data_bytes // record_bytes)


def query_block_rows(budget: WorkerBudget, dim: int, k: int) -> int:
    """Queries searched at once: each holds its float32 vector (4*D) and, twice (a shard's
    answer and the merge), k distances and ids (24*k); a quarter of the data bytes."""
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one neighbour")
    return int(min(MAX_QUERY_BLOCK, max(1, budget.data_bytes // 4 // (4 * dim + 24 * k))))


IVF_MIN_POINTS_PER_LIST = 39  # Faiss warns below it


def ivf_train_rows(budget: WorkerBudget, dim: int) -> int:
    """Most rows of the IVF quantiser's training sample the driver holds: three float32 copies
    (the sample read, its unit-norm copy, Faiss's k-means working copy) within the data bytes."""
    return int(max(IVF_MIN_POINTS_PER_LIST, budget.data_bytes // (3 * 4 * dim)))


def actor_memory(budget: WorkerBudget, held_bytes: int) -> int:
    """Ray's `memory=` for an actor that will hold `held_bytes` of partition data: the idle
    worker (base) plus the data and its temporaries (held / fill), never more than the budget.
    A partition sized to the data share asks for exactly the budget; a smaller one for less."""
    need = budget.base_bytes + math.ceil(max(0, held_bytes) / budget.fill)
    return int(min(budget.worker_bytes, need))


def _rows_after(budget: WorkerBudget, fixed: int, row_bytes: int, what: str) -> int:
    """Rows of `row_bytes` that fit the data share after `fixed` bytes; a clear error if none do."""
    if fixed >= budget.data_bytes:
        raise ValueError(
            f"{what} take {format_bytes(fixed)} per worker, more than the budget's data share "
            f"{format_bytes(budget.data_bytes)}: raise --worker-memory"
        )
    return max(1, (budget.data_bytes - fixed) // row_bytes)


def knn_shard_fixed_bytes(
    dim: int, k: int, *, query_rows: int, nlist: int = 0, pq_bytes: int = 0, n_uids: int = 0
) -> int:
    """A k-NN shard actor's bytes besides its rows: one query block (float32 queries, and the
    shard's answer of k + KNN_EXTRA candidates: 4*D + 24*(k + KNN_EXTRA) per query), the IVF's
    coarse centroids (nlist x D float32) and PQ codebooks (256 x D float32), and, built for a
    subset, the caller's uid list (n_uids x KNN_UID_BYTES)."""
    search = query_rows * (4 * dim + 24 * (k + KNN_EXTRA))
    quantiser = nlist * dim * 4 + (256 * dim * 4 if pq_bytes else 0)
    return search + quantiser + n_uids * KNN_UID_BYTES


def knn_shard_rows(
    budget: WorkerBudget,
    dim: int,
    k: int,
    *,
    query_rows: int,
    index: str = "flat",
    nlist: int = 0,
    pq_bytes: int = 0,
    n_uids: int = 0,
) -> int:
    """Rows one k-NN shard actor may hold: what is left of the data share after its fixed bytes
    (`knn_shard_fixed_bytes`), over the bytes of a row (`vector_row_bytes`)."""
    fixed = knn_shard_fixed_bytes(dim, k, query_rows=query_rows, nlist=nlist, pq_bytes=pq_bytes, n_uids=n_uids)
    row = vector_row_bytes(dim, index, pq_bytes=pq_bytes)
    return _rows_after(budget, fixed, row, f"a k-NN shard's query block, quantiser and uid list (dim {dim}, k={k})")


def knn_shard_memory(budget: WorkerBudget, rows: int, dim: int, k: int, *, query_rows: int, **shape) -> int:
    """Ray `memory=` of a k-NN shard actor holding `rows` rows (`actor_memory` of its rows and
    fixed bytes); `shape`: `knn_shard_rows`' index, nlist, pq_bytes and n_uids."""
    index = shape.pop("index", "flat")
    fixed = knn_shard_fixed_bytes(dim, k, query_rows=query_rows, **shape)
    return actor_memory(budget, rows * vector_row_bytes(dim, index, pq_bytes=shape.get("pq_bytes", 0)) + fixed)


def kmeans_fixed_bytes(dim: int, k: int, *, block_rows: int = 0) -> int:
    """A Lloyd actor's bytes besides its rows (scale.dkmeans' module doc): float32 centroids,
    int64 sums and a block's float64 group sums (20*k*D at most), and one block's scratch
    (block_rows x (4*k + 14*D): its scores and float32 / float64 rows)."""
    return 20 * k * dim + block_rows * (4 * k + 14 * dim)


def kmeans_shard_rows(budget: WorkerBudget, dim: int, k: int, *, block_rows: int = 0) -> int:
    """Rows one Lloyd actor may hold: fp16 rows (2*D) and the last pass's int32 cluster and
    float32 score (8) each, after its fixed bytes (`kmeans_fixed_bytes`)."""
    fixed = kmeans_fixed_bytes(dim, k, block_rows=block_rows)
    return _rows_after(budget, fixed, 2 * dim + 8, f"k={k} centroids of dim {dim} and a block of {block_rows} rows")


def kmeans_actor_memory(budget: WorkerBudget, rows: int, dim: int, k: int, *, block_rows: int = 0) -> int:
    """Ray `memory=` of a Lloyd actor holding `rows` rows (`actor_memory` of its shard and fixed bytes)."""
    return actor_memory(budget, rows * (2 * dim + 8) + kmeans_fixed_bytes(dim, k, block_rows=block_rows))


def ingest_partition_cap(budget: WorkerBudget, *, mean_input_bytes: int = 200 * KiB) -> int:
    """Files per ingest partition at most: a partition holds its inputs' encoded bytes (and their
    hash records) until it writes them; half the data share for them, the other half for the
    decode of one image (bounded apart by --max-decoded-bytes)."""
    return max(1, budget.data_bytes // (2 * max(1, mean_input_bytes)))


def component_partitions(n_edges: int, budget: WorkerBudget, *, edge_bytes: int = EDGE_ROW_BYTES) -> int:
    """Node partitions of the connected components: a star step's task holds its partition's
    edges both ways (2E / P rows) and as many new ones (`scale.components`), at SKEW times its
    share, within the data share."""
    if n_edges < 0:
        raise ValueError(f"n_edges={n_edges}: count edges from 0")
    return max(1, math.ceil(2 * n_edges * 2 * edge_bytes * SKEW / budget.data_bytes))


def ledger_range_rows(budget: WorkerBudget) -> int:
    """uids one ledger or verify range task holds (`ledger.write_parts(range_rows=...)`)."""
    return max(1, budget.data_bytes // LEDGER_ROW_BYTES)


def shard_plan_range_rows(budget: WorkerBudget) -> int:
    """Records one shard-plan range task holds (`select.run_shards(range_rows=...)`)."""
    return max(1, budget.data_bytes // SHARD_PLAN_ROW_BYTES)


def order_records(budget: WorkerBudget) -> int:
    """Records one `poolorder` uid bucket or order range task holds."""
    return max(1, budget.data_bytes // ORDER_RECORD_BYTES)


class OverBudgetError(ValueError):
    """A stage's one task would hold more than one worker's budget: it refuses before any work,
    naming the budget that would do."""


def one_task_images(budget: WorkerBudget, per_image: int) -> int:
    """Images a stage's one task holding ~`per_image` bytes each can hold under `budget`."""
    return max(0, (budget.worker_bytes - budget.base_bytes) // per_image)


def cluster_task_images(budget: WorkerBudget) -> int:
    """Candidates the cluster stage's one task can hold under `budget` (the flow partitions past it)."""
    return one_task_images(budget, CLUSTER_TASK_IMAGE_BYTES)


def retrieve_task_images(budget: WorkerBudget) -> int:
    """Candidates the retrieve stage's one task can hold under `budget` (past it the stage is
    partitioned: `scale.pretrieve` without seeds, `scale.pseeds` with them)."""
    return one_task_images(budget, RETRIEVE_TASK_IMAGE_BYTES)


def check_one_task(stage: str, n: int, per_image: int, note: str) -> None:
    """Refuse, before any work, `n` candidates that a stage's one task, holding ~`per_image`
    bytes each, cannot hold under the job's `--worker-memory` (`current()`); the message names a
    budget that would hold them, and `note` what else would do. No budget: no check."""
    budget = current()
    if budget is None:
        return
    most = one_task_images(budget, per_image)
    if n <= most:
        return
    need = budget.base_bytes + n * per_image
    raise OverBudgetError(
        f"the {stage} stage holds its {n:,} candidates in one task (~{per_image} B each, "
        f"{format_bytes(need)} in all), more than --worker-memory {format_bytes(budget.worker_bytes)} allows "
        f"({most:,} candidates): run with --worker-memory {math.ceil(need / GiB * 10) / 10:g}GiB or more, on "
        f"nodes that have it ({note})"
    )


def ray_options(budget: WorkerBudget) -> dict:
    """Keyword arguments for `.options(...)` of a stage's tasks and actors: Ray's `memory`
    resource, so a node runs at most (its memory resource / budget) of them at once."""
    return {"memory": int(budget.worker_bytes)}


def resident_cpus(num_cpus: float, memory: list[int | None]) -> float:
    """CPUs each of a set of actors that must all be resident at once (k-NN shards, k-means
    actors: one per entry of `memory`, their Ray memory requests) asks for: `num_cpus`, or the
    running cluster's CPUs shared among them when it has fewer (they work in turn; Ray would
    otherwise wait forever for the ones it cannot place). A clear error when their memory
    requests together exceed the cluster's memory resource."""
    import ray

    if not ray.is_initialized() or not memory:
        return num_cpus
    res = ray.cluster_resources()
    need, have = sum(m or 0 for m in memory), res.get("memory", 0)
    if need > have:
        raise RuntimeError(
            f"{len(memory)} partitions must be resident at once and ask for {format_bytes(need)} of memory in all; "
            f"the Ray cluster has {format_bytes(have)}: add nodes"
        )
    cpus = res.get("CPU", 0)
    if cpus <= 0 or num_cpus * len(memory) <= cpus:
        return num_cpus
    return math.floor(cpus / len(memory) * 1e4) / 1e4


# The budget of a run, for stages run inside Ray tasks (copy detection, decontamination, cluster).
_KV_NAMESPACE, _KV_KEY = "lvd", "worker_budget:"
_current: WorkerBudget | None = None  # this process's, set by job_budget


def _job_key() -> bytes | None:
    """The GCS key of this Ray job's budget (None without a running Ray)."""
    import ray

    if not ray.is_initialized():
        return None
    return (_KV_KEY + ray.get_runtime_context().get_job_id()).encode()


def _kv(op: str, key: bytes, value: bytes | None = None):
    """Ray's GCS key-value store (`ray.experimental.internal_kv`, what Ray's own libraries use);
    None when it cannot be reached (the budget is then unknown there: partitions keep their sizes)."""
    from ray.experimental import internal_kv

    try:
        if op == "put":
            return internal_kv._internal_kv_put(key, value, overwrite=True, namespace=_KV_NAMESPACE)
        if op == "del":
            return internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
        return internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - an unreachable store means "no budget", never a failed stage
        return None


def _publish(budget: WorkerBudget | None) -> None:
    if (key := _job_key()) is None:
        return
    if budget is None:
        _kv("del", key)
    else:
        _kv("put", key, json.dumps(asdict(budget)).encode())


@contextmanager
def job_budget(budget: WorkerBudget | None):
    """Within the block, `current()` gives `budget` here and in every task and actor of this
    Ray job (None: no budget); the previous one is restored after."""
    global _current
    before = _current
    _current = budget
    _publish(budget)
    try:
        yield budget
    finally:
        _current = before
        _publish(before)


def current() -> WorkerBudget | None:
    """The budget set by `job_budget` in this process, else the one this Ray job published
    (a stage running in a Ray task), else None."""
    if _current is not None:
        return _current
    key = _job_key()
    raw = _kv("get", key) if key is not None else None
    return WorkerBudget(**json.loads(raw)) if raw else None


@dataclass(frozen=True)
class ClusterSize:
    """What a pool needs under one budget (see the module doc's formula)."""

    n_images: int
    vector_bytes: int  # the pool's resident vector bytes (vector_row_bytes * N)
    hash_bytes: int  # the pool's hash records (HASH_RECORD_BYTES * N)
    workers: int  # workers whose budgets hold the vectors at once
    workers_per_node: int
    nodes: int


def cluster_size(
    n_images: int,
    dim: int,
    budget: WorkerBudget,
    *,
    node_memory: int,
    node_cores: int,
    index: str = "flat",
    pq_bytes: int = 0,
) -> ClusterSize:
    """Workers and nodes for `n_images` under `budget` on nodes of `node_memory` / `node_cores`."""
    vec = n_images * vector_row_bytes(dim, index, pq_bytes=pq_bytes)
    workers = max(1, math.ceil(vec / budget.data_bytes))
    per_node = min(node_cores, int(node_memory * 0.9) // budget.worker_bytes)
    if per_node < 1:
        raise ValueError(
            f"a node of {format_bytes(node_memory)} holds no worker of {format_bytes(budget.worker_bytes)}"
        )
    return ClusterSize(
        n_images=n_images,
        vector_bytes=vec,
        hash_bytes=n_images * HASH_RECORD_BYTES,
        workers=workers,
        workers_per_node=per_node,
        nodes=math.ceil(workers / per_node),
    )


# Checking the budget: peak resident memory of the driver and of every Ray worker it started.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # per-node daemons, not workers


def ray_worker_pids(root: int | None = None) -> dict[int, str]:
    """{pid: process title} of the Ray worker processes (titles `ray::...`) descended from
    `root` (default: this process, which started a local Ray or a `cluster_utils.Cluster`)."""
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        titles[int(entry)] = cmd
    out, todo = {}, [root or os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            if titles.get(pid, "").startswith("ray::") and titles[pid] not in RAY_AGENTS:
                out[pid] = titles[pid]
    return out


def peak_rss(pid: int) -> int | None:
    """VmHWM (the kernel's peak resident set, bytes) of `pid`, or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) * KiB if line else None


def reset_peak_rss(pid: int) -> None:
    """Restart `pid`'s VmHWM from its current RSS (Linux clear_refs 5), so a window's peak is
    its own and not an earlier stage's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass
class PeakWatch:
    """Peak RSS of this process (the driver) and of each Ray worker process it started, over a
    `with` block: VmHWM is reset at entry and polled every `interval` s (a worker that exits
    is known by its last poll), so short-lived actors are caught too."""

    interval: float = 0.05
    driver: int = 0
    workers: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (last title, peak)

    def __enter__(self) -> PeakWatch:
        for pid in [os.getpid(), *ray_worker_pids()]:
            reset_peak_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        self.driver = max(self.driver, peak_rss(os.getpid()) or 0)
        for pid, title in ray_worker_pids().items():
            peak = peak_rss(pid)
            if peak is not None:
                old = self.workers.get(pid, ("", 0))
                busy = title if not title.startswith("ray::IDLE") else old[0] or title
                self.workers[pid] = (busy, max(old[1], peak))

    @property
    def worker_max(self) -> int:
        """The largest peak of any worker in the window."""
        return max((p for _, p in self.workers.values()), default=0)
