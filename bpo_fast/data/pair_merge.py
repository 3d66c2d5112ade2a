"""Merging pair files: the ``.rank{r}`` shards of a distributed ``build-pairs`` run (or any pair
files) into one, deduplicated by id, every record checked with the pair schema, written
atomically. A torn last line (what a killed writer leaves) is skipped and reported; a bad line
before the end fails like a record that breaks the schema."""

import dataclasses
import os
from dataclasses import dataclass, field

from bpo_fast.data.jsonl import detect_format, iter_jsonl
from bpo_fast.data.schema import SchemaError, validate_pair
from bpo_fast.errors import UserError, input_file, output_file

__all__ = ["MergeSummary", "merge_pairs", "find_shards"]


def _split_ext(path):
    root, ext = os.path.splitext(path)
    return (root, ext) if ext else (path, ".jsonl")


@dataclass
class MergeSummary:
    out: str
    inputs: list
    written: int = 0
    duplicates: int = 0          # same id seen again with the same content (dropped)
    conflicts: int = 0           # same id with different content (first kept, counted)
    invalid: list = field(default_factory=list)   # (file, line, reason)
    torn: list = field(default_factory=list)      # (file, line, reason): unparseable lines

    def to_dict(self):
        return dataclasses.asdict(self)

    def format(self):
        lines = [f"merged {len(self.inputs)} file(s) -> {self.out}: {self.written} pairs, "
                 f"{self.duplicates} duplicate(s) dropped, {self.conflicts} conflicting duplicate(s)"]
        if self.torn:
            lines.append(f"skipped {len(self.torn)} torn last line(s) (a killed writer): " +
                         "; ".join(f"{f}:{n}" for f, n, _ in self.torn[:5]))
        if self.invalid:
            lines.append(f"skipped {len(self.invalid)} invalid record(s) (bad JSON or schema): " +
                         "; ".join(f"{f}:{n}: {r}" for f, n, r in self.invalid[:5]))
        return "\n".join(lines)


def find_shards(out):
    """The shard files ``<stem>.rank{r}.jsonl`` of an output path, sorted by rank."""
    import glob
    import re

    root, ext = _split_ext(out)
    pat = re.compile(re.escape(root) + r"\.rank(\d+)" + re.escape(ext) + "$")
    found = [(int(m.group(1)), p) for p in glob.glob(glob.escape(root) + ".rank*" + ext)
             if (m := pat.match(p))]
    return [p for _, p in sorted(found)]


def _is_shard(path):
    import re

    return re.search(r"\.rank\d+(\.[^./]*)?$", path) is not None


def _pair_records(path, on_bad):
    """``(line, pair record)`` of a pair file: our JSONL as it is, official BPO records
    (``completions``; a JSON array or JSONL) expanded into their pairs (one that cannot be
    paired yields its ``ValueError``)."""
    from bpo_fast.data.bpo_format import is_official_record, iter_pair_records, official_to_pairs

    if detect_format(path) == "json":  # a JSON array (the official release's layout)
        yield from iter_pair_records(path)
        return
    index = 0
    for n, rec in iter_jsonl(path, on_bad=on_bad):
        if is_official_record(rec):
            try:
                pairs = official_to_pairs(rec, index)
            except ValueError as exc:
                pairs = [ValueError(f"BPO record: {exc}")]
            for pair in pairs:
                yield n, pair
        else:
            yield n, rec
        index += 1


def merge_pairs(inputs, out, *, skip_invalid=False, strict_conflicts=False):
    """Merge pair files into ``out`` (atomic), deduplicated by id, every record schema-checked.

    ``inputs``: paths (or one output path whose ``.rank{r}`` shards are merged). A record that
    fails :func:`validate_pair` raises ``ValueError`` (nothing is written) unless
    ``skip_invalid``; torn/unparseable lines are skipped and reported. The first record of an id
    wins; a later one with different content is a conflict (counted, or an error with
    ``strict_conflicts``).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("inputs: expected at least one file")
    files = []
    for p in inputs:
        shards = find_shards(p)
        if os.path.isdir(p):
            raise UserError(f"inputs: {p!r} is a directory, expected a pair file (JSONL)")
        if os.path.isfile(p):
            if shards and not _is_shard(p):
                raise ValueError(f"inputs: {p!r} is a file and also the base of shards "
                                 f"{shards[:2]}...; name the files to merge explicitly")
            files.append(p)
        else:
            if not shards:
                raise FileNotFoundError(f"inputs: {p!r} is neither a file nor the base of .rank* shards")
            files.extend(shards)
    for f in files:
        input_file(f, "inputs", what="pair file (JSONL)", text=True)
    output_file(out, "out")
    from bpo_fast.errors import FILE, CommandGuard

    with CommandGuard("merge-pairs", inputs=[("inputs", f, FILE) for f in files],
                      outputs=[("out", out, FILE)]):
        return _merge(files, out, skip_invalid, strict_conflicts)


def _merge(files, out, skip_invalid, strict_conflicts):
    import json

    from bpo_fast.data.jsonl import atomic_write_jsonl

    s = MergeSummary(out=os.fspath(out), inputs=files)
    seen = {}
    records = []
    for f in files:
        def on_bad(n, reason, f=f):
            # a torn last line is what a kill leaves (skipped, reported); a bad line before the
            # end is damage: it fails like a record that breaks the schema
            (s.torn if reason.startswith("torn") else s.invalid).append((f, n, reason))

        for n, rec in _pair_records(f, on_bad):
            if isinstance(rec, Exception):  # an official BPO record that cannot be paired
                s.invalid.append((f, n, str(rec)))
                continue
            try:
                validate_pair(rec)
            except SchemaError as exc:
                s.invalid.append((f, n, str(exc)))
                continue
            prev = seen.get(rec["id"])
            if prev is not None:
                if json.dumps(prev, sort_keys=True) == json.dumps(rec, sort_keys=True):
                    s.duplicates += 1
                else:
                    s.conflicts += 1
                    if strict_conflicts:
                        raise ValueError(f"{f}:{n}: id {rec['id']!r} appears with different content")
                continue
            seen[rec["id"]] = rec
            records.append(rec)
    if s.invalid and not skip_invalid:
        raise UserError(f"{len(s.invalid)} record(s) are not JSON or fail the pair schema, nothing written; first: "
                         + "; ".join(f"{f}:{n}: {r}" for f, n, r in s.invalid[:3])
                         + " (use skip_invalid / --skip-invalid to drop them)")
    s.written = atomic_write_jsonl(out, records)
    return s

