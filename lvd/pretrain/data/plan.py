"""Where the data stands, whatever the number of ranks reading it: the basis of elastic resume.

A run's data is `streams` (V) fixed sample sequences, chosen when the run starts and kept in
every checkpoint: stream v is `raw_stream(shards, SlotSpec(slot=v, n_slots=V, ...))`, a pure
function of (shards, seed, v, V, shuffle settings), the same on any world size. A layout
(N ranks, W reader slots per rank, B images per rank per step) reads them like this:
- rank r owns the streams v with v % N == r (so at most V ranks can share a run's data);
- its W' = min(W, owned) logical workers own every W'-th of those streams, and rank batch i
  (counted from the segment's first step) is made by logical worker i % W';
- a worker fills its batches from its streams in turn, one sample each (round robin).
So a stream's position (samples taken) after any step is a pure function of the step and
the layout, and rank 0 can write all V positions into the checkpoint without a collective.

A `DataPlan` is one segment: a layout, the step it started at and the positions then. A
resume on the same layout continues the segment, so the batches equal an uninterrupted
run's exactly. A resume on another layout (ranks, workers or batch size) opens a new segment
at the checkpoint's step from the positions the old layout had reached: every stream goes on
at exactly the sample where it stopped, so across the resume no sample is repeated and none
is skipped. (What changes is which rank reads which stream, and the order in which streams
are mixed into batches.) The guarantee assumes every step consumed B raw samples per rank,
which holds because corrupt samples are replaced inside their batch; a batch whose samples
are all corrupt is skipped whole (`shards.py`), and then that worker's streams are B samples
further on than the count says, so a resume re-reads up to B samples per such batch.

Cost: a worker holds one shuffle buffer (`shuffle_buffer` raw samples) and `shuffle_shards`
open tars per stream it reads: as before when V = ranks x workers, up to min(shards, 8) / (ranks
x workers) times more on small layouts, and V / (N' x W') after shrinking to N' ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIN_STREAMS = 8  # a 1-process run can later be resumed on up to 8 ranks (more with more shards)


def default_streams(n_shards: int, world_size: int, workers: int) -> int:
    """V for a new run: one per reader slot of the starting layout, and at least
    min(shards, MIN_STREAMS), so small runs can grow without any shard read twice an epoch."""
    return max(world_size * max(workers, 1), min(n_shards, MIN_STREAMS), 1)


def _count_below(n: int, residue: int, modulus: int) -> int:
    """How many i in [0, n) have i % modulus == residue (residue < modulus)."""
    return max(0, (n - residue + modulus - 1) // modulus)


@dataclass(frozen=True, kw_only=True)
class WorkerStart:
    """What one logical worker reads from a given step on."""

    streams: tuple[int, ...]
    skips: tuple[int, ...]  # samples of each stream already taken
    turn: int  # index into `streams` of the stream that gives the next sample


@dataclass(frozen=True, kw_only=True)
class DataPlan:
    streams: int  # V, fixed for the whole run
    step: int  # the segment's first step
    positions: tuple[int, ...]  # samples of each stream taken before `step`
    world_size: int
    workers: int  # reader slots per rank: max(num_workers, 1)
    batch_size: int  # images per rank per step

    def __post_init__(self) -> None:
        if len(self.positions) != self.streams or min(self.positions, default=0) < 0:
            raise ValueError(f"need {self.streams} non-negative stream positions, got {self.positions}")
        if min(self.world_size, self.workers, self.batch_size, self.step + 1) < 1:
            raise ValueError(f"bad data layout {self}")
        if self.world_size > self.streams:
            raise ValueError(
                f"this run's data is {self.streams} streams, fixed when it started (ranks x "
                f"reader workers then, or min(shards, {MIN_STREAMS}) if more); {self.world_size} "
                f"ranks cannot share them. Resume on at most {self.streams} ranks, or start a new "
                "run (another --out) on this many"
            )

    def rank_streams(self, rank: int) -> list[int]:
        return list(range(rank, self.streams, self.world_size))

    def n_workers(self, rank: int) -> int:
        """Logical workers of `rank`: W, or fewer when the rank owns fewer streams."""
        return min(self.workers, len(self.rank_streams(rank)))

    def worker_streams(self, rank: int, logical: int) -> list[int]:
        return self.rank_streams(rank)[logical :: self.n_workers(rank)]

    def _taken(self, rank: int, logical: int, step: int) -> int:
        """Samples logical worker `logical` of `rank` took in [self.step, step)."""
        return _count_below(step - self.step, logical, self.n_workers(rank)) * self.batch_size

    def worker_start(self, rank: int, logical: int, step: int) -> WorkerStart:
        if step < self.step:
            raise ValueError(f"step {step} is before this data segment's start {self.step}")
        streams = self.worker_streams(rank, logical)
        taken, m = self._taken(rank, logical, step), len(streams)
        skips = tuple(self.positions[v] + _count_below(taken, t, m) for t, v in enumerate(streams))
        return WorkerStart(streams=tuple(streams), skips=skips, turn=taken % m)

    def positions_at(self, step: int) -> tuple[int, ...]:
        """Samples taken from each stream before `step` (all ranks, no collective)."""
        out = list(self.positions)
        for rank in range(self.world_size):
            for logical in range(self.n_workers(rank)):
                start = self.worker_start(rank, logical, step)
                for v, skip in zip(start.streams, start.skips):
                    out[v] = skip
        return tuple(out)

    def same_layout(self, *, world_size: int, workers: int, batch_size: int) -> bool:
        return (self.world_size, self.workers, self.batch_size) == (world_size, max(workers, 1), batch_size)

    def resumed(self, step: int, *, world_size: int, workers: int, batch_size: int) -> DataPlan:
        """The plan to read on from `step` with this layout: this segment when the layout is
        the same, else a new segment starting at `step` from the positions reached."""
        if self.same_layout(world_size=world_size, workers=workers, batch_size=batch_size):
            return self
        return DataPlan(
            streams=self.streams,
            step=step,
            positions=self.positions_at(step),
            world_size=world_size,
            workers=max(workers, 1),
            batch_size=batch_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPlan:
        try:
            return cls(**{**d, "positions": tuple(int(p) for p in d["positions"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an lvd data plan: {e}") from None


def fresh_plan(*, n_shards: int, world_size: int, workers: int, batch_size: int) -> DataPlan:
    streams = default_streams(n_shards, world_size, workers)
    return DataPlan(
        streams=streams,
        step=0,
        positions=(0,) * streams,
        world_size=world_size,
        workers=max(workers, 1),
        batch_size=batch_size,
    )


def plan_for(
    saved: dict[str, Any] | None, *, step: int, n_shards: int, world_size: int, workers: int, batch_size: int
) -> DataPlan:
    """The plan a run reads from `step` on: a new run's, or a checkpoint's `data` remapped
    to this layout. A checkpoint without one (older lvd) resumes as if its run had been
    read with this layout from step 0, which is exact only on its own layout."""
    if saved is None:
        plan = fresh_plan(n_shards=n_shards, world_size=world_size, workers=workers, batch_size=batch_size)
    else:
        plan = DataPlan.from_dict(saved["plan"])
    return plan.resumed(step, world_size=world_size, workers=workers, batch_size=batch_size)


def checkpoint_data(plan: DataPlan, step: int) -> dict[str, Any]:
    """What a checkpoint at `step` keeps: the plan, and every stream's position for accounting."""
    return {"plan": plan.to_dict(), "positions": list(plan.positions_at(step))}
