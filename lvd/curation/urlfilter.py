"""URL / domain filter: block and allow lists read at ingest, and a per-domain cap after it.

Where the url comes from: an img2dataset sidecar (`KEY.json` beside a file or in a tar, its
`url` field) or a Parquet `url` column beside the image-bytes column (`meta["url"]`). An input
with no url passes the blocklist; with an allowlist it is blocked (rule `allowlist: no url`).

Rule files (`--url-blocklist FILE`, `--url-allowlist FILE`), one rule a line, `#` comments:
- `example.com`: the domain and every subdomain (`img.example.com`);
- a line with `/` or `*`: a shell-style pattern over the whole url (`*://*/nsfw/*`);
- `re:PATTERN`: a Python regular expression searched in the url.
Blocklist first: a url matching any blocklist rule is `url_blocked` with that rule; then, with
an allowlist, a url matching none of it is `url_blocked` with rule `allowlist: no rule matched`.

Per-domain cap (`--max-per-domain N`, `cap_domains`): the number of images a domain keeps
is global, so it runs after ingest over every accepted record: per domain (the url's host, a
leading `www.` dropped) the first N distinct uids in uid order are kept (the uid is the
content's sha256, so the choice is deterministic and independent of partitioning); every
other input of that domain is `domain_capped`, rule `max_per_domain=N: DOMAIN`. Its decisions
are written to RUN/domaincap/capped.parquet and `apply_caps` turns those records into
rejections wherever ingest records are read, so dedup, the shards and the ledger all see them.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CAP_SCHEMA = pa.schema([("source", pa.string()), ("uid", pa.string()), ("rule", pa.string())])


def read_rules(path: str | Path) -> tuple[str, ...]:
    """The rules of a list file (see module doc), comments and blank lines dropped; bad
    regular expressions are refused here, with their line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"url rule file {path}: cannot read it ({e})") from None
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        rule = line.split("#", 1)[0].strip() if not line.strip().startswith("re:") else line.strip()
        if not rule:
            continue
        if rule.startswith("re:"):
            try:
                re.compile(rule[3:])
            except re.error as e:
                raise ValueError(f"{path}:{n}: bad regular expression {rule[3:]!r} ({e})") from None
        rules.append(rule if "/" in rule or "*" in rule or rule.startswith("re:") else rule.lower().lstrip("."))
    return tuple(rules)


def url_of(meta) -> str | None:
    """The url an input's metadata names (img2dataset sidecar JSON, or a Parquet `url` column)."""
    if not isinstance(meta, dict):
        return None
    side = meta.get("json")
    url = side.get("url") if isinstance(side, dict) else None
    url = url if url is not None else meta.get("url")
    return url if isinstance(url, str) and url else None


def domain_of(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    return host[4:] if host.startswith("www.") else host


def matches(url: str, rule: str) -> bool:
    if rule.startswith("re:"):
        return re.search(rule[3:], url) is not None
    if "/" in rule or "*" in rule:
        return fnmatch.fnmatchcase(url, rule)
    host = domain_of(url)
    return host == rule or host.endswith("." + rule)


@dataclass(frozen=True)
class UrlVerdict:
    rule: str
    url: str | None

    def detail(self) -> dict:
        return {"rule": self.rule, "url": self.url}


def check_url(meta, block: tuple[str, ...], allow: tuple[str, ...]) -> UrlVerdict | None:
    """The verdict blocking this input, or None when it passes (see module doc)."""
    url = url_of(meta)
    if url is None:
        return UrlVerdict("allowlist: no url", None) if allow else None
    for rule in block:
        if matches(url, rule):
            return UrlVerdict(f"blocklist: {rule}", url)
    if allow and not any(matches(url, rule) for rule in allow):
        return UrlVerdict("allowlist: no rule matched", url)
    return None


def cap_domains(pairs, max_per_domain: int) -> dict[str, str]:
    """uid -> rule for every (uid, url) pair beyond the first `max_per_domain` distinct uids of
    its domain in uid order. A uid over the cap in one domain may be kept through another."""
    by_domain: dict[str, set[str]] = defaultdict(set)
    for uid, url in pairs:
        by_domain[domain_of(url)].add(uid)
    over: dict[str, set[str]] = {}
    for domain, uids in by_domain.items():
        for uid in sorted(uids)[max_per_domain:]:
            over.setdefault(uid, set()).add(domain)
    kept = {(u, domain_of(url)) for u, url in pairs} - {(u, d) for u, ds in over.items() for d in ds}
    kept_uids = {u for u, _ in kept}
    return {u: f"max_per_domain={max_per_domain}: {min(ds)}" for u, ds in over.items() if u not in kept_uids}


def capped_table(records: pa.Table, max_per_domain: int) -> pa.Table:
    """CAP_SCHEMA rows: every accepted input (columns source, status, uid, meta) whose uid the cap removes."""
    rec = records.filter(pc.equal(records["status"], "accepted")).to_pydict()
    urls = [url_of(json.loads(m)) if m else None for m in rec["meta"]]
    pairs = [(u, url) for u, url in zip(rec["uid"], urls) if url]
    rules = cap_domains(pairs, max_per_domain)
    rows = [(s, u, rules[u]) for s, u in zip(rec["source"], rec["uid"]) if u in rules]
    rows.sort()
    return pa.table(
        {"source": [r[0] for r in rows], "uid": [r[1] for r in rows], "rule": [r[2] for r in rows]}, schema=CAP_SCHEMA
    )


def run_domain_cap(run_dir: Path, max_per_domain: int | None) -> pa.Table:
    """Write (or, with no cap, remove) RUN/domaincap/capped.parquet from the raw ingest records
    (read without the cap applied, so a rerun decides the same); returns the capped rows."""
    from lvd import durable
    from lvd.curation import rundir

    path = rundir.cap_path(run_dir)
    if max_per_domain is None:
        path.unlink(missing_ok=True)
        return pa.table({f.name: [] for f in CAP_SCHEMA}, schema=CAP_SCHEMA)
    if max_per_domain < 1:
        raise ValueError(f"max_per_domain={max_per_domain}: use at least 1 image per domain")
    raw = pa.concat_tables(
        [pq.read_table(p, columns=["source", "status", "uid", "meta"]) for p in rundir.ingest_manifests(run_dir)]
    )
    table = capped_table(raw, max_per_domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, table)
    return table
