"""What ingest does with a partition whose Ray worker keeps dying: find the input that kills it.

An input that crashes the decoder (a segfault in a codec) or takes more memory than the node
has kills the worker process, not the Python code, so it never becomes a row with a reason;
Ray retries the partition (`RunnerConfig.max_retries`) and then gives up. `runner` hands such
a partition here (ingest's stage callable carries it as `isolation`). One Ray task
(no Ray retries) walks the partition's inputs in order, one at a time, appending each
finished record to a journal beside the outputs. When the worker dies, the first input
without a journal entry is the one it died on: it gets `item_retries` more tries (a death
may have been another task's memory), after which it is recorded as rejected with reason
`worker_died` (uid and byte count kept when its bytes were read). The next task skips the
journalled inputs and the rejected one and goes on, so each killer costs
`item_retries + 1` worker deaths and the partition is still read once per death, never
decoded again. When every input has a record the task writes the partition's outputs and
done-marker exactly as `runner.run_one` would (the marker also lists `worker_died` inputs).

The journal (`.part-NNNNNN.isolate.tmp-journal`) is a temp file: the next stage run removes a
leftover one (`runner.remove_stale`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

from lvd.curation import runner
from lvd.curation.ingest import INGEST_SCHEMA, blob_table, ingest_item
from lvd.curation.sources import iter_items

REASON = "worker_died"


def journal_path(stage_dir: Path, stem: str) -> Path:
    return Path(stage_dir) / f".{stem}.isolate{runner.TMP_TAG}journal"


@dataclasses.dataclass(frozen=True)
class IngestIsolation:
    item_retries: int = 1  # deaths on one input beyond the first before it is rejected
    max_killed: int = 16  # more killers than this in one partition: not the inputs, give up

    def run(self, fn, partition, stage_dir: Path, cfg_hash: str, error: Exception, rcfg) -> dict:
        """Ingest `partition` input by input; returns its done-marker."""
        import ray

        journal = journal_path(stage_dir, runner.stem_of(partition))
        journal.unlink(missing_ok=True)
        task = ray.remote(_ingest_one_by_one).options(max_retries=0, num_cpus=rcfg.num_cpus)
        killed: dict[int, str] = {}
        deaths: Counter[int] = Counter()
        while True:
            try:
                marker = ray.get(task.remote(fn, partition, str(stage_dir), cfg_hash, killed))
            except runner.WORKER_DEATHS as e:
                done, ended = _read_journal(journal)
                if ended:  # every input had a record: it died writing, not on an input
                    raise e
                k = next(i for i in range(len(done) + len(killed) + 1) if i not in done and i not in killed)
                deaths[k] += 1
                if deaths[k] > self.item_retries:
                    killed[k] = REASON
                if len(killed) > self.max_killed:
                    raise RuntimeError(
                        f"partition {partition.index}: the worker died on {len(killed)} inputs one "
                        "after another; that is no longer one bad input (memory? a broken worker "
                        "environment?)"
                    ) from e
                continue
            journal.unlink(missing_ok=True)
            return marker


def _ingest_one_by_one(fn, partition, stage_dir: str, cfg_hash: str, killed: dict[int, str]) -> dict:
    """Ray task: records of every input (journalled ones read back, killed ones rejected)."""
    per_item = getattr(fn, "ingest_item", None) or (lambda item: ingest_item(item, fn.cfg))
    journal = journal_path(Path(stage_dir), runner.stem_of(partition))
    done, _ = _read_journal(journal)
    records, blobs = [], {}
    with open(journal, "a") as log:
        for k, item in enumerate(iter_items(partition)):
            if k in done:
                record, data = done[k]
            elif k in killed:
                record, _ = ingest_item(dataclasses.replace(item, error=killed[k]), fn.cfg)
                data = None
            else:
                record, data = per_item(item)
                log.write(json.dumps({"k": k, "record": _enc(record), "data": _enc(data)}) + "\n")
                log.flush()  # a killed process loses nothing written; the page cache keeps it
            records.append(record)
            if data is not None:
                blobs.setdefault(record["uid"], data)
        log.write(json.dumps({"end": len(records)}) + "\n")
        log.flush()
    tables = {
        "": pa.Table.from_pylist(records, schema=INGEST_SCHEMA),
        "blobs": blob_table(blobs),
    }
    died = sorted(records[k]["source"] for k in killed)
    return runner.write_outputs(tables, partition, stage_dir, cfg_hash, worker_died=died)


def _read_journal(path: Path) -> tuple[dict[int, tuple[dict, bytes | None]], bool]:
    """(k -> (record, data) of journalled inputs, whether the walk reached the end); a torn
    last line (killed mid-write) is ignored."""
    done, ended = {}, False
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return done, ended
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "end" in entry:
            ended = True
        else:
            done[entry["k"]] = (_dec(entry["record"]), _dec(entry["data"]))
    return done, ended


def _enc(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _enc(v) for k, v in value.items()}
    return value


def _dec(value):
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _dec(v) for k, v in value.items()}
    return value
