"""The bad-sample policy of every command, and the errors file it writes.

One rule for ``build-pairs``, ``ref-logps``, ``train`` (its ``--data`` and ``--eval-data``) and
``eval-*``: a sample that cannot be used -- a malformed record, an image that does not decode, a
prompt whose ``<image>`` placeholders disagree with its images, a sample the processor rejects
(Qwen2-VL: an aspect ratio over 200) -- is named in the run's errors file (record id, file, line,
reason), skipped, and counted in the summary / metrics. A running job never ends on one: when more
than ``--max-bad-fraction`` of a file's samples are bad, the run stops with exit status 2
(:class:`TooManyBadSamples`), the reasons counted.

Where a bad sample is met during a run:

- up front, when a data set is read (malformed records, missing images): the data set's
  ``skipped`` list, handed to :meth:`BadSamples.add_skipped`;
- while a sample is loaded and encoded (image decoding, the processor): :class:`GuardedPairs`
  wraps the data set and the encoder (in DataLoader workers too) and returns, with each item, the
  notes of the bad samples it met; the caller hands them to :meth:`BadSamples.note`. For
  training, a bad sample's place in its batch goes to the next good sample of the data set (so a
  batch keeps its size, and every other batch, a resumed run's included, is unchanged); for
  reference log-probs it is left out; for evaluation the stand-in gets weight 0.

The errors file is a side file: a JSONL whose first line is a header
(``{"bpo_fast": "errors", "command": ...}``). A command removes, truncates or appends to an
existing errors file only when that header says it wrote it (:func:`claim_side_file`); any other
file at that path (the input data, an unrelated file) is left alone and named in a one-line
error.
"""

import json
import os

import torch

from bpo_fast.data.images import ImageError
from bpo_fast.data.jsonl import JsonlWriter, iter_jsonl, repair_torn_tail
from bpo_fast.errors import UserError
from bpo_fast.options import MAX_BAD_FRACTION

__all__ = ["BadSamples", "TooManyBadSamples", "GuardedPairs", "GuardedStream", "SampleError",
           "claim_side_file",
           "check_side_file", "ErrorsFile", "side_path", "load_records",
           "is_own_side_file", "side_header", "DEFAULT_MAX_BAD_FRACTION", "sample_kind",
           "check_max_bad_fraction"]

DEFAULT_MAX_BAD_FRACTION = MAX_BAD_FRACTION  # declared once, with the option, in options.py
SIDE_KEY = "bpo_fast"


class SampleError(ValueError):
    """A sample that cannot be used as it is (its prompt and images disagree, ...)."""


class TooManyBadSamples(UserError):
    """More than ``--max-bad-fraction`` of a file's samples are bad (exit status 2)."""


# What a bad sample raises while it is loaded and encoded: our image loader's ImageError and
# SampleError (ValueErrors), the processor's ValueError (an image it rejects, a placeholder count
# that does not match), an OSError of a file that went away. Anything else is a bug and keeps its
# traceback.
SAMPLE_ERRORS = (ValueError, OSError)


def sample_kind(exc):
    """The reason class of a bad sample's exception: ``image``, ``prompt`` or ``processor``."""
    if isinstance(exc, (ImageError, OSError)):
        return "image"
    if isinstance(exc, SampleError):
        return "prompt"
    return "processor"


def check_max_bad_fraction(v, name="max_bad_fraction"):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1], got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------------------------
# side files: removed, truncated or appended to only when a header says we wrote them


def side_header(kind, command):
    """The first line of a side file ``kind`` ("errors") written by ``command``."""
    return {SIDE_KEY: kind, "command": command}


def _first_line(path, limit=1 << 16):
    with open(path, "rb") as f:
        return f.readline(limit)


def is_own_side_file(path, kind="errors"):
    """Whether ``path`` starts with the header of a bpo-fast side file of ``kind``."""
    try:
        line = _first_line(path)
    except OSError:
        return False
    if line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        head = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(head, dict) and head.get(SIDE_KEY) == kind


def check_side_file(path, arg, *, kind="errors"):
    """Raise :class:`UserError` naming ``arg`` when ``path`` exists and is not a side file of
    ``kind`` that bpo-fast wrote (its header) or an empty file; changes nothing. Returns whether
    it exists and holds something."""
    if not os.path.lexists(path):
        return False
    if os.path.isdir(path):
        raise UserError(f"{arg}: {path!r} is a directory, expected a file path")
    empty = os.path.isfile(path) and os.path.getsize(path) == 0
    if not empty and not is_own_side_file(path, kind):
        raise UserError(f"{arg}: {path!r} exists and was not written by bpo-fast (no bpo-fast "
                        f"{kind} header on its first line); it is left as it is: name another "
                        "file or move it away")
    return not empty


def claim_side_file(path, arg, *, kind="errors", resume=False):
    """Make ``path`` ready for a run's side file: kept for appending (``resume``) or removed (a
    fresh run), only when it is ours (its header) or empty (:func:`check_side_file`; any other
    file raises and is left as it is). Returns True when an own file is kept for appending."""
    if not os.path.lexists(path):
        return False
    held = check_side_file(path, arg, kind=kind)
    if resume and held:
        repair_torn_tail(path)
        return True
    os.remove(path)
    return False


class ErrorsFile:
    """An errors JSONL with its header, opened at the first entry (a clean run leaves none);
    entries already in it (a resumed run) are not written twice."""

    def __init__(self, path, command, *, arg="errors", resume=False, fsync=True, key=None):
        self.path, self.command, self.fsync = path, command, fsync
        self.key = key or (lambda e: json.dumps(e, sort_keys=True))
        self._writer = None
        self.existing = []
        if claim_side_file(path, arg, resume=resume):
            self.existing = [e for _, e in iter_jsonl(path)
                             if isinstance(e, dict) and SIDE_KEY not in e]
        self._seen = {self.key(e) for e in self.existing}

    def write(self, entries):
        """Append the entries not already there; returns those written."""
        fresh = []
        for e in entries:
            k = self.key(e)
            if k not in self._seen:
                self._seen.add(k)
                fresh.append(e)
        if fresh:
            if self._writer is None:
                new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
                self._writer = JsonlWriter(self.path, fsync=self.fsync)
                if new:
                    self._writer.write(side_header("errors", self.command))
            self._writer.write_batch(fresh)
        return fresh

    def close(self):
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# the policy


class BadSamples:
    """Counts the bad samples of each data file of a run, names them in the errors file, and stops
    the run (:class:`TooManyBadSamples`) when more than ``max_fraction`` of a file's samples are
    bad. ``total(file, n)`` declares a file's sample count (bad ones included)."""

    def __init__(self, errors_path, command, *, max_fraction=DEFAULT_MAX_BAD_FRACTION,
                 resume=False, arg="errors", rank=0):
        self.command = command
        self.max_fraction = check_max_bad_fraction(max_fraction)
        self.errors = ErrorsFile(errors_path, command, arg=arg, resume=resume,
                                 key=lambda e: (e.get("file"), e.get("id"), e.get("line"),
                                                e.get("reason")))
        self.path = errors_path
        self.rank = rank
        self.totals = {}
        self.bad = {}           # file -> {(id, line)}: each bad sample once, whatever its reasons
        self.by_kind = {}       # file -> {kind: count}
        self.first = {}         # file -> its first bad sample's entry (named in the stop message)
        for e in self.errors.existing:  # a resumed run: the bad samples found before
            self._count(e)

    MIN_STREAM = 100  # a stream (size unknown) is judged once this many samples were read

    def total(self, file, n):
        self.totals[file] = int(n)

    def seen(self, file, n):
        """A stream's samples read so far (its size is unknown): judged from MIN_STREAM on."""
        self.totals[file] = int(n) if n >= self.MIN_STREAM else 0

    def _count(self, e):
        key = (e.get("id"), e.get("line"))
        seen = self.bad.setdefault(e.get("file"), set())
        if key in seen:
            return False
        seen.add(key)
        self.first.setdefault(e.get("file"), e)
        kinds = self.by_kind.setdefault(e.get("file"), {})
        kinds[e.get("kind", "record")] = kinds.get(e.get("kind", "record"), 0) + 1
        return True

    def note(self, notes):
        """Record bad-sample notes (dicts from :meth:`entry`); duplicates count once."""
        if not notes:
            return
        for e in notes:
            self._count(e)
        self.errors.write(notes)

    @staticmethod
    def entry(file, sample_id, line, reason, kind):
        return {"stage": "sample", "kind": kind, "file": file, "id": sample_id, "line": line,
                "reason": " ".join(str(reason).split())}

    def add_skipped(self, file, dataset):
        """The records ``dataset`` left out when it was read (``dataset.skipped``: line and
        reason), and its size: ``len(dataset)`` + skipped."""
        skipped = list(getattr(dataset, "skipped", ()) or ())
        notes = []
        for s in skipped:
            line, reason = (s.line, s.reason) if hasattr(s, "line") else (s[0], s[1])
            notes.append(self.entry(file, None, line, reason, "record"))
        self.total(file, len(dataset) + len(skipped))
        self.note(notes)

    def count(self, file=None):
        if file is None:
            return sum(len(v) for v in self.bad.values())
        return len(self.bad.get(file, ()))

    def reasons(self, file):
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.by_kind.get(file, {}).items()))

    def check(self, world=1):
        """Raise :class:`TooManyBadSamples` when a file's bad samples exceed the share; returns
        the bad samples counted so far. With ``world > 1`` the counts are summed over ranks
        first (a collective: every rank calls it at the same point), so every rank stops
        alike."""
        files = sorted(self.totals)
        counts = [self.count(f) for f in files]
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor(counts, dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            counts = [int(x) for x in t.tolist()]
        for f, n in zip(files, counts):
            total = self.totals[f]
            if total and n > self.max_fraction * total:
                first = self.first.get(f)
                where = "" if first is None else (
                    f"; the first: {f}:{first.get('line')}: "
                    + (f"{first['id']!r}: " if first.get("id") is not None else "")
                    + first.get("reason", ""))
                raise TooManyBadSamples(
                    f"{self.command}: {n} of the {total} samples of {f} are bad (more than "
                    f"--max-bad-fraction {self.max_fraction:g}): {self.reasons(f)}{where}; each "
                    f"is named in {self.path}")
        return sum(counts)

    def summary(self):
        return {f: {"bad": self.count(f), "total": self.totals.get(f), **self.by_kind.get(f, {})}
                for f in sorted(set(self.totals) | set(self.bad))}

    def close(self):
        self.errors.close()


def side_path(path, kind="errors"):
    """``captions.jsonl`` -> ``captions.errors.jsonl``: the default side file of a data file."""
    root, ext = os.path.splitext(path)
    return f"{root if ext in ('.json', '.jsonl') else path}.{kind}.jsonl"


def load_records(load, path, command, *, errors=None, max_fraction=DEFAULT_MAX_BAD_FRACTION):
    """``load(path, on_bad)`` of a records file (captions, answers) under the policy: each
    malformed record reported to ``on_bad(line, reason)`` is named in ``errors`` (default
    :func:`side_path`), skipped and counted; more than ``max_fraction`` of the records stop the
    command (:class:`TooManyBadSamples`). Returns ``(what load returned, BadSamples)``."""
    bad = BadSamples(errors or side_path(path), command, max_fraction=max_fraction)
    try:
        try:
            out = load(path, lambda line, reason: bad.note(
                [BadSamples.entry(path, None, line, reason, "record")]))
        except ValueError:
            if bad.count(path):   # no good record left: the share says why (the first named)
                bad.total(path, bad.count(path))
                bad.check()
            raise
        bad.total(path, len(out) + bad.count(path))
        bad.check()
    finally:
        bad.close()
    return out, bad


# ---------------------------------------------------------------------------------------------
# loading and encoding under the policy


def _record_where(dataset, j):
    recs = getattr(dataset, "records", None)
    if recs is None or j >= len(recs):
        return None, None
    r = recs[j]
    return r.get("id"), r.get("line", r.get("row"))


class GuardedPairs(torch.utils.data.Dataset):
    """``encode(dataset[j])`` for the positions ``indices`` (default: all) of ``dataset``, under
    the policy: a sample whose loading or encoding raises one of :data:`SAMPLE_ERRORS` is noted
    (``item["bad"]``: entries for :meth:`BadSamples.note`) and

    - ``substitute=True``: replaced by the next good sample of the data set (wrapping around;
      ``item["stand_in"]`` is then True); every sample bad: a marker ``{"skip": True}``;
    - ``substitute=False``: a marker ``{"skip": True, "bad": [...]}`` in its place.

    Works in DataLoader workers (each remembers the positions it found bad)."""

    def __init__(self, dataset, encode, *, file, substitute=True, indices=None):
        self.dataset, self.encode, self.file = dataset, encode, file
        self.substitute = substitute
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self._bad = set()

    def __len__(self):
        return len(self.indices)

    def _load(self, j):
        try:
            return self.encode(self.dataset[j]), None
        except SAMPLE_ERRORS as exc:
            sid, line = _record_where(self.dataset, j)
            return None, BadSamples.entry(self.file, sid, line, f"{type(exc).__name__}: {exc}",
                                          sample_kind(exc))

    def __getitem__(self, i):
        j = self.indices[i]
        item, note = (None, None) if j in self._bad else self._load(j)
        if item is not None:
            item.update(bad=[], stand_in=False)
            return item
        notes = [note] if note is not None else []
        self._bad.add(j)
        if self.substitute:
            n = len(self.dataset)
            for k in range(1, n):
                jj = (j + k) % n
                if jj in self._bad:
                    continue
                item, note = self._load(jj)
                if item is not None:
                    item.update(bad=notes, stand_in=True)
                    return item
                self._bad.add(jj)
                notes.append(note)
        return {"skip": True, "bad": notes, "stand_in": False}


class GuardedStream(torch.utils.data.IterableDataset):
    """:class:`GuardedPairs` for a stream (``StreamingPairs``): a bad sample is noted and the
    stream goes on to the next one (a batch keeps its size); the records the stream itself
    skipped (its ``skipped`` list: row and reason) are noted too. Each item carries ``"seen"``:
    the samples read so far, bad ones included (a stream's size is unknown up front)."""

    def __init__(self, stream, encode, *, file):
        self.stream, self.encode, self.file = stream, encode, file

    def set_epoch(self, epoch, start=0):
        self.stream.set_epoch(epoch, start)

    def __iter__(self):
        notes, seen, skipped = [], 0, len(self.stream.skipped)
        for item in self.stream:
            for row, reason in self.stream.skipped[skipped:]:
                notes.append(BadSamples.entry(self.file, None, row, reason, "record"))
            seen += len(self.stream.skipped) - skipped + 1
            skipped = len(self.stream.skipped)
            try:
                enc = self.encode(item)
            except SAMPLE_ERRORS as exc:
                notes.append(BadSamples.entry(self.file, item.get("id"), item.get("line"),
                                              f"{type(exc).__name__}: {exc}", sample_kind(exc)))
                continue
            enc.update(bad=notes, stand_in=False, seen=seen)
            notes = []
            yield enc
