"""Partitioned global stages: the pieces that let curation outgrow one process's RAM.

Each module here spreads one global computation (hash-bucket dedup, connected components,
a sharded vector index, distributed k-means) over Ray tasks or actors, so that no process
holds the whole pool; a per-worker memory budget (`budget`) sizes the partitions.
"""
