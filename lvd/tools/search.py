"""A saved cosine Faiss index over an `lvd embed` folder, and nearest-image search with it.

INDEX/
  index.faiss    `IndexFlatIP` (exact) or `IndexIVFFlat` (inner product, spherical lists) over
                 the L2-normalised CLS vectors; Faiss id = row of items.parquet
  items.parquet  `row`, `id`, `path` of every indexed image (the embed folder's rows, in order)
  meta.json      kind, nlist, nprobe, dim, count, and the embed run's model / size / resize, so
                 `lvd search` embeds a query exactly as the indexed images were

Building and searching are `lvd.curation.knn_index` (exact below `exact_below` vectors, IVF
above; `kind` forces one). The index is built on the CPU so it can be written as is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.curation.knn_index import IndexConfig, build_index, search
from lvd.tools.store import load_embeddings

KINDS = ("auto", "exact", "ivf")
_NORM_ROWS = 65_536


@dataclass(frozen=True, kw_only=True)
class IndexBuildConfig:
    kind: str = "auto"  # "auto": exact below `exact_below` vectors, IVF above
    exact_below: int = 200_000
    nlist: int | None = None  # IVF lists; None: 4 * sqrt(N)
    nprobe: int = 32  # IVF lists visited per query (stored; `lvd search --nprobe` overrides)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: choose one of {KINDS}")

    def index_config(self) -> IndexConfig:
        below = {"auto": self.exact_below, "exact": 1 << 62, "ivf": 0}[self.kind]
        return IndexConfig(exact_below=below, nlist=self.nlist, nprobe=self.nprobe, seed=self.seed, use_gpu=False)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 = nearest
    row: int
    id: str
    path: str
    score: float  # cosine similarity


def unit_rows(x_ND: np.ndarray) -> np.ndarray:
    """float32 copy of `x_ND` with unit rows (a zero row stays zero), in chunks for memmaps."""
    out = np.empty(x_ND.shape, np.float32)
    for s in range(0, len(x_ND), _NORM_ROWS):
        chunk = np.asarray(x_ND[s : s + _NORM_ROWS], np.float32)
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        out[s : s + len(chunk)] = chunk / np.maximum(norms, 1e-12)
    return out


class SearchIndex:
    """A loaded index plus its items; `search(vectors, k)` gives ranked `Hit`s per query."""

    def __init__(self, index: faiss.Index, items: pa.Table, meta: dict) -> None:
        self.index, self.meta = index, meta
        self.ids = items["id"].to_pylist()
        self.paths = items["path"].to_pylist()

    @classmethod
    def load(cls, root: str | Path, *, nprobe: int | None = None) -> SearchIndex:
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(
                f"{root} is not an `lvd index` folder (no meta.json); build one with lvd index --out {root}"
            )
        meta = json.loads((root / "meta.json").read_text())
        index = faiss.read_index(str(root / "index.faiss"))
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = nprobe or meta["nprobe"]
        return cls(index, pq.read_table(root / "items.parquet"), meta)

    def search(self, queries_QD: np.ndarray, k: int) -> list[list[Hit]]:
        """Raw or unit query vectors (normalised here); at most `k` hits each, best first."""
        nb = search(self.index, unit_rows(np.atleast_2d(queries_QD)), k)
        return [
            [
                Hit(r + 1, int(i), self.ids[i], self.paths[i], float(s))
                for r, (i, s) in enumerate(zip(ids, sims))
                if i >= 0
            ]
            for ids, sims in zip(nb.ids_QK, nb.sims_QK)
        ]


def build_index_dir(embeddings: str | Path, out: str | Path, cfg: IndexBuildConfig | None = None) -> SearchIndex:
    """Index an `lvd embed` folder's CLS vectors (cosine) and save it to `out`."""
    cfg = cfg or IndexBuildConfig()
    emb = load_embeddings(embeddings)
    if len(emb.ids) == 0:
        raise ValueError(
            f"{embeddings} holds no embedded images (all {len(emb.skipped)} inputs were skipped); nothing to index"
        )
    x_ND = unit_rows(emb.cls_ND)
    icfg = cfg.index_config()
    index = build_index(x_ND, icfg)
    is_ivf = isinstance(index, faiss.IndexIVF)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # written last
    faiss.write_index(index, str(out / "index.faiss"))
    items = pa.table({"row": np.arange(len(emb.ids), dtype=np.int64), "id": emb.ids, "path": emb.paths})
    pq.write_table(items, out / "items.parquet")
    meta = {
        "kind": "ivf" if is_ivf else "exact",
        "nlist": int(index.nlist) if is_ivf else None,
        "nprobe": cfg.nprobe,
        "dim": int(index.d),
        "count": int(index.ntotal),
        "embeddings": str(Path(embeddings).resolve()),
        **{k: emb.meta.get(k) for k in ("model", "size", "resize")},
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "meta.json")
    return SearchIndex.load(out)


def search_images(index: SearchIndex, images: list, k: int, *, model=None, device: str = "auto") -> list[list[Hit]]:
    """Hits for PIL query images, embedded as the indexed images were (model, size, resize
    from the index's meta.json unless `model` — a spec or a loaded backbone — is given)."""
    from lvd.tools.features import FeatureConfig, extract_batch, load_model

    spec = model if model is not None else index.meta.get("model")
    if spec is None or (isinstance(spec, str) and not Path(spec).exists()):
        raise FileNotFoundError(
            f"the index names model {spec!r}, which is not here: pass --model (the backbone the images were embedded with)"
        )
    backbone = load_model(spec, device=device) if isinstance(spec, (str, Path)) else spec
    cfg = FeatureConfig(size=index.meta["size"], resize=index.meta["resize"], device=device)
    return index.search(extract_batch(backbone, images, cfg).cls_BD, k)
