"""The guard against mass removal: a stage that would remove more than a set fraction of its
input raises before it writes anything, naming the stage, the fraction and the flag."""

from __future__ import annotations

_HINT = {
    "dedup": "Check the hash radii (--phash-radius)",
    "copy detection": "Check --copy-threshold / --copy-model (the calibration is in the message above)",
    "decontamination": "Check the eval sets and --copy-threshold / --copy-model",
}


class MassRemovalError(RuntimeError):
    """A stage would remove more than the allowed fraction of its input; nothing was written."""

    def __init__(
        self,
        stage: str,
        removed: int,
        total: int,
        limit: float,
        flag: str,
        largest: list[list[str]] | None = None,
        detail: str = "",
    ):
        self.stage, self.removed, self.total, self.limit, self.flag = stage, removed, total, limit, flag
        self.largest = largest or []
        self.detail = detail
        frac = removed / max(total, 1)
        super().__init__(
            f"{stage} would remove {removed} of {total} images ({100 * frac:.1f}%), more than the "
            f"allowed {100 * limit:.0f}%: stopped before the ledger changed. {detail}"
            f"{_HINT.get(stage, 'Check its settings')}, or raise the limit with {flag} if this is really so."
        )

    def __reduce__(self):  # picklable through Ray
        return (
            MassRemovalError,
            (self.stage, self.removed, self.total, self.limit, self.flag, self.largest, self.detail),
        )


def check_removal(
    stage: str,
    removed: int,
    total: int,
    limit: float,
    flag: str = "--max-remove-fraction",
    largest: list[list[str]] | None = None,
    detail: str = "",
) -> None:
    if total and removed / total > limit:
        raise MassRemovalError(stage, removed, total, limit, flag, largest, detail)
