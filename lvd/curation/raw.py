"""`RawItem`: one input's bytes (or the error that kept them from being read) and its metadata.

Shared by the source readers (folders, tars, parquet) so none of them imports another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Source suffix standing for the unreadable rest of a truncated or corrupt tar archive.
CORRUPT_TAR_MEMBER = "<corrupt>"


@dataclass
class RawItem:
    source: str  # file path, TARPATH::MEMBER, or PARQUETPATH::ROW
    data: bytes | None  # None when nothing could be read (then `error` says why)
    error: str | None  # a rejection reason from docs/architecture.md, or None
    meta: dict = field(default_factory=dict)  # sidecars / other parquet columns


def parse_sidecar(suffix: str, raw: bytes):
    """Sidecar bytes as metadata: JSON parsed when it parses, text stripped otherwise."""
    text = raw.decode("utf-8", errors="replace")
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return text  # keep malformed JSON as text rather than losing it
    return text.strip()
