"""The curation stages as runner work, one module per stage (group): picklable stage callables
and a `run_*` function each. Where each reads and writes: `lvd.curation.rundir`.

- `ingest_dedup`: ingest (per partition) and hash dedup (global);
- `copy`: copy features (per partition), copy detection and decontamination (global);
- `embed`: the embedder's and the copy model's vectors (actors, per partition);
- `select`: clustering and the shard writer (one task per tar, manifest last);
- `retrieve`: retrieval against seed sets, or balanced sampling.
"""
