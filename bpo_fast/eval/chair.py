"""CHAIR: object hallucination in captions (Rohrbach et al., "Object Hallucination in Image
Captioning", EMNLP 2018), with recall of the objects present.

Given captions (id -> text), ground-truth objects (id -> names) and a synonym table:

- **CHAIR-i** = hallucinated object mentions / all object mentions
- **CHAIR-s** = captions with at least one hallucinated mention / all captions
- **recall**  = ground-truth objects mentioned / all ground-truth objects (distinct per image)

A *mention* is a match of a synonym phrase in the caption; every mention counts (as in the
original implementation: "a dog chases a dog" is two mentions). A mention is hallucinated when
its canonical object is not among the image's ground-truth objects. Ratios with a zero
denominator are ``None`` (e.g. CHAIR-i of captions that mention no object at all), never NaN.

Objects are phrases
-------------------
An object is any phrase: "dog", "hot dog", "dining table", or in the shapes world "red circle"
(colour + kind, so a right shape in the wrong colour is a hallucination). Matching is on words:
case-insensitive, punctuation splits words and phrases ("red. circle" is no match), hyphens
count as spaces, and the **longest phrase wins** at each position, scanning left to right
("hot dog" is one mention of "hot dog", not of "dog"). Plurals are matched without listing them:
each phrase also matches with its last word in plural form (regular rules plus common irregular
nouns: "people", "men", "mice", "knives", ...). Negation is not handled ("no dog" mentions a
dog), as in the original metric.

Synonym files
-------------
- Text (the standard CHAIR/COCO format): one object a line, ``canonical, syn1, syn2, ...``; the
  canonical name is itself a synonym; blank lines and lines starting with ``#`` are skipped.
  A phrase listed under two objects keeps the first and warns.
- JSON: an object ``{"canonical": ["syn1", "syn2", ...], ...}``.
Without a table, the vocabulary is the set of all ground-truth object names (each its own
canonical form, no synonyms): only objects that occur in some image can then be detected.

Ground-truth names are mapped through the table too (a ground-truth "men" counts as "man" when
"man" is an object); names the table does not know stay objects of their own (they can only
lower recall) and are listed in ``ChairResult.unknown_ground_truth``.

Public API: :class:`SynonymTable` (``from_file``, ``from_dict``, ``from_objects``,
``find_mentions``, ``canonical``), :func:`load_synonyms`, :func:`compute_chair` ->
:class:`ChairResult`, :func:`load_captions`, :func:`load_ground_truth`.
"""

import json
import os
import re
import warnings
from dataclasses import dataclass, field

__all__ = ["SynonymTable", "Mention", "ChairResult", "compute_chair", "load_synonyms",
           "load_captions", "load_ground_truth", "pluralize", "InputError"]


class InputError(ValueError):
    """A malformed or inconsistent input file (the message names the file and line)."""


_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_IS_WORD = re.compile(r"[a-z0-9]")

_IRREGULAR = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "goose": "geese", "foot": "feet", "tooth": "teeth", "knife": "knives", "wife": "wives",
    "leaf": "leaves", "shelf": "shelves", "loaf": "loaves", "wolf": "wolves", "calf": "calves",
    "half": "halves", "scarf": "scarves", "sheep": "sheep", "deer": "deer", "fish": "fish",
    "skis": "skis", "scissors": "scissors", "glasses": "glasses", "ox": "oxen", "cactus": "cacti",
    "bus": "buses", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes",
}


def pluralize(word):
    """English plural of one lower-case word (regular rules + common irregular nouns)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _normalize(text):
    """Lower-cased word/punctuation tokens; hyphens and underscores become spaces."""
    return _WORD_RE.findall(re.sub(r"[-_]", " ", text.lower()))


def _phrase_key(name):
    toks = _normalize(name)
    if not toks or not all(_IS_WORD.match(t) for t in toks):
        return None
    return tuple(toks)


@dataclass(frozen=True)
class Mention:
    object: str          # canonical object
    text: str            # the words matched, as normalised
    start: int           # index of the first matched word in the caption's token list


class SynonymTable:
    """Phrase -> canonical object, with plural forms, for longest-match-first lookup."""

    def __init__(self, entries, *, source="synonyms"):
        if not isinstance(entries, dict):
            raise TypeError(f"{source}: expected a dict canonical -> list of synonyms, "
                            f"got {type(entries).__name__}")
        self.source = source
        self.objects = []
        self._forms = {}            # tuple of words -> canonical
        self.conflicts = []
        explicit = {}               # forms listed by the user win over generated plurals
        for canon, syns in entries.items():
            if isinstance(syns, str) or not all(isinstance(s, str) for s in syns):
                raise TypeError(f"{source}[{canon!r}]: expected a list of strings")
            ckey = _phrase_key(canon) if isinstance(canon, str) else None
            if ckey is None:
                raise ValueError(f"{source}: object name {canon!r} has no words")
            canonical = " ".join(ckey)
            if canonical in self.objects:
                continue
            self.objects.append(canonical)
            for syn in [canon, *syns]:
                key = _phrase_key(syn)
                if key is None:
                    raise ValueError(f"{source}[{canon!r}]: synonym {syn!r} has no words")
                if explicit.get(key, canonical) != canonical:
                    self.conflicts.append((" ".join(key), explicit[key], canonical))
                    continue
                explicit[key] = canonical
        for key, canonical in explicit.items():
            plural = key[:-1] + (pluralize(key[-1]),)
            # a plural that is itself listed (e.g. "glasses") keeps its own meaning
            if plural not in explicit:
                self._forms.setdefault(plural, canonical)
        self._forms.update(explicit)
        if self.conflicts:
            shown = "; ".join(f"{p!r} under {a!r} and {b!r}" for p, a, b in self.conflicts[:5])
            warnings.warn(f"{source}: {len(self.conflicts)} phrase(s) listed under two objects, "
                          f"the first kept: {shown}", stacklevel=2)
        self.max_len = max((len(k) for k in self._forms), default=0)

    @classmethod
    def from_dict(cls, entries, source="synonyms"):
        return cls(entries, source=source)

    @classmethod
    def from_objects(cls, names):
        """A table whose objects are ``names`` (no synonyms beyond plurals)."""
        return cls({n: [] for n in names}, source="ground-truth objects")

    @classmethod
    def from_file(cls, path):
        """Load a text ("canonical, syn, ...") or JSON (``{canonical: [syns]}``) table."""
        if not os.path.isfile(path):
            raise InputError(f"synonyms: no such file {path!r}")
        from bpo_fast.data.jsonl import read_text

        text = read_text(path)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            for canon, syns in data.items():
                if isinstance(syns, str) or not isinstance(syns, list):
                    raise InputError(f"{path}: object {canon!r}: expected a list of synonyms")
            return cls(data, source=path)
        entries = {}
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            names = [s.strip() for s in line.split(",")]
            if any(_phrase_key(s) is None for s in names):
                raise InputError(f"{path}:{n}: expected 'canonical, synonym, ...' with a word "
                                 f"in every field, got {line!r}")
            entries.setdefault(names[0], [])
            entries[names[0]].extend(names[1:])
        if not entries:
            raise InputError(f"{path}: no objects in the synonym file")
        return cls(entries, source=path)

    def __len__(self):
        return len(self.objects)

    def canonical(self, name):
        """Canonical object of a whole phrase (synonym or plural), or None."""
        key = _phrase_key(name) if isinstance(name, str) else None
        return self._forms.get(key) if key else None

    def find_mentions(self, text):
        """All object mentions in ``text``, longest phrase first, left to right."""
        toks = _normalize(text)
        out = []
        i = 0
        while i < len(toks):
            hit = None
            if _IS_WORD.match(toks[i]):
                for n in range(min(self.max_len, len(toks) - i), 0, -1):
                    key = tuple(toks[i:i + n])
                    if key in self._forms:
                        hit = (n, key)
                        break
            if hit is None:
                i += 1
                continue
            n, key = hit
            out.append(Mention(self._forms[key], " ".join(key), i))
            i += n
        return out


def load_synonyms(path):
    return SynonymTable.from_file(path)


@dataclass
class ChairResult:
    chair_i: float              # None when no caption mentions any object
    chair_s: float
    recall: float               # None when no image has a ground-truth object
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_hallucinated_captions: int
    n_gt_objects: int
    n_gt_mentioned: int
    per_caption: list = field(default_factory=list)
    unknown_ground_truth: list = field(default_factory=list)

    def scores(self):
        return {"chair_i": self.chair_i, "chair_s": self.chair_s, "recall": self.recall}

    def to_dict(self, details=True):
        d = {k: getattr(self, k) for k in (
            "chair_i", "chair_s", "recall", "n_captions", "n_mentions", "n_hallucinated_mentions",
            "n_hallucinated_captions", "n_gt_objects", "n_gt_mentioned", "unknown_ground_truth")}
        if details:
            d["per_caption"] = self.per_caption
        return d

    def summary(self):
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"
        return (f"CHAIR-i {pct(self.chair_i)} ({self.n_hallucinated_mentions}/{self.n_mentions} "
                f"mentions)  CHAIR-s {pct(self.chair_s)} ({self.n_hallucinated_captions}/"
                f"{self.n_captions} captions)  recall {pct(self.recall)} "
                f"({self.n_gt_mentioned}/{self.n_gt_objects} objects)")


def _ratio(a, b):
    return a / b if b else None


def compute_chair(captions, ground_truth, synonyms=None, *, ignore_extra_ground_truth=False):
    """CHAIR-i, CHAIR-s and recall of ``captions`` (id -> text) against ``ground_truth``
    (id -> iterable of object names).

    ``synonyms``: a :class:`SynonymTable`, a dict ``{canonical: [synonyms]}``, a path to a
    synonym file, or None (the ground-truth names are the vocabulary). Every caption id must be
    in ``ground_truth``, and every ground-truth id must have a caption unless
    ``ignore_extra_ground_truth`` (then images without a caption are left out).
    """
    if not isinstance(captions, dict):
        raise TypeError(f"captions: expected a dict id -> caption, got {type(captions).__name__}")
    if not isinstance(ground_truth, dict):
        raise TypeError(f"ground_truth: expected a dict id -> list of objects, "
                        f"got {type(ground_truth).__name__}")
    if not captions:
        raise ValueError("captions: expected at least one caption, got none")
    for cid, cap in captions.items():
        if not isinstance(cap, str):
            raise TypeError(f"captions[{cid!r}]: expected a str, got {type(cap).__name__}")
    for gid, objs in ground_truth.items():
        if isinstance(objs, str) or not all(isinstance(o, str) for o in objs):
            raise TypeError(f"ground_truth[{gid!r}]: expected a list of object names")
    missing = [i for i in captions if i not in ground_truth]
    if missing:
        raise ValueError(f"ground_truth: no objects for {len(missing)} caption id(s): "
                         f"{_show(missing)}")
    extra = [i for i in ground_truth if i not in captions]
    if extra and not ignore_extra_ground_truth:
        raise ValueError(f"captions: no caption for {len(extra)} ground-truth id(s): "
                         f"{_show(extra)} (pass ignore_extra_ground_truth=True to score only "
                         f"the captioned images)")

    if synonyms is None:
        table = SynonymTable.from_objects(
            sorted({o for objs in ground_truth.values() for o in objs if _phrase_key(o)}))
    elif isinstance(synonyms, SynonymTable):
        table = synonyms
    elif isinstance(synonyms, dict):
        table = SynonymTable.from_dict(synonyms)
    elif isinstance(synonyms, (str, os.PathLike)):
        table = SynonymTable.from_file(os.fspath(synonyms))
    else:
        raise TypeError(f"synonyms: expected a SynonymTable, dict, path or None, "
                        f"got {type(synonyms).__name__}")

    unknown = set()
    per = []
    n_ment = n_hall = n_hall_caps = n_gt = n_gt_hit = 0
    for cid, cap in captions.items():
        gt = []
        for name in ground_truth[cid]:
            canon = table.canonical(name)
            if canon is None:
                key = _phrase_key(name)
                if key is None:
                    continue            # an empty name is no object
                canon = " ".join(key)
                unknown.add(canon)
            if canon not in gt:
                gt.append(canon)
        mentions = table.find_mentions(cap)
        hallucinated = [m for m in mentions if m.object not in gt]
        mentioned = list(dict.fromkeys(m.object for m in mentions))
        covered = [o for o in gt if o in mentioned]
        n_ment += len(mentions)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        n_gt += len(gt)
        n_gt_hit += len(covered)
        per.append({
            "id": cid, "caption": cap,
            "mentions": [{"object": m.object, "text": m.text, "word": m.start} for m in mentions],
            "hallucinated": list(dict.fromkeys(m.object for m in hallucinated)),
            "ground_truth": gt, "covered": covered,
            "missing": [o for o in gt if o not in mentioned],
        })
    return ChairResult(
        chair_i=_ratio(n_hall, n_ment), chair_s=_ratio(n_hall_caps, len(captions)),
        recall=_ratio(n_gt_hit, n_gt), n_captions=len(captions), n_mentions=n_ment,
        n_hallucinated_mentions=n_hall, n_hallucinated_captions=n_hall_caps,
        n_gt_objects=n_gt, n_gt_mentioned=n_gt_hit, per_caption=per,
        unknown_ground_truth=sorted(unknown) if synonyms is not None else [],
    )


def _show(ids, k=5):
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:k]) + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")


# --------------------------------------------------------------------------- files

_ID_KEYS = ("id", "image_id", "question_id")
_CAPTION_KEYS = ("caption", "text", "answer")
_OBJECT_KEYS = ("objects",)
_RECORD_KEYS = _ID_KEYS + _CAPTION_KEYS + _OBJECT_KEYS


def _iter_json_items(path, what):
    """Yield ``(line, item)`` for a JSONL file, a JSON array, or a JSON object (id -> value:
    yields ``(line, (id, value))``)."""
    if not os.path.isfile(path):
        raise InputError(f"{what} file: no such file {path!r}")
    from bpo_fast.data.jsonl import read_text

    try:
        text = read_text(path)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}: the {what} file is empty")
    if stripped[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped[0] == "{" and "\n" in stripped.strip():
                data = None         # maybe JSONL whose records are objects; parsed below
            else:
                raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(data, list):
            yield from _array_lines(path, text, data)
            return
        if isinstance(data, dict):
            if any(k in data for k in _RECORD_KEYS):     # a single record, not an id mapping
                yield 1, data
                return
            base = text.count("\n", 0, len(text) - len(stripped)) + 1
            for k, v in data.items():
                yield base, (k, v)
            return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: invalid JSON: {exc.msg}") from None


def _array_lines(path, text, data):
    # line of each array element: re-walk the text with raw_decode (json.loads gave no positions)
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = dec.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, item
        pos = end


def _record_id(path, line, rec, what):
    if not isinstance(rec, dict):
        raise InputError(f"{path}:{line}: expected a JSON object with an id, "
                         f"got {type(rec).__name__}")
    for k in _ID_KEYS:
        if k in rec:
            v = rec[k]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
                raise InputError(f"{path}:{line}: '{k}' must be a non-empty string or an integer, "
                                 f"got {v!r}")
            return str(v)
    raise InputError(f"{path}:{line}: {what} record has no id (expected one of {list(_ID_KEYS)})")


def _bad_record(path, line, exc, on_bad):
    """A record-level problem: reported to ``on_bad(line, reason)`` (the bad-sample policy:
    named, skipped, counted) when given, else raised."""
    if on_bad is None:
        raise exc
    on_bad(line, str(exc).split(f"{path}:{line}: ", 1)[-1])


def text_records(path, noun, get_id, keys, *, label=None, id_name="id", on_bad=None):
    """``{id: text}`` of a file of id + text records (captions, answers) or a JSON object
    ``{id: text}``: ``get_id(line, rec)`` reads a record's id, the first of ``keys`` its text.
    ``on_bad(line, reason)``: a malformed record is reported there and skipped (else it raises
    :class:`InputError` naming the file and line)."""
    out, lines = {}, {}
    for line, rec in _iter_json_items(path, noun + "s"):
        try:
            if isinstance(rec, tuple):
                rid, text = rec
            else:
                rid = get_id(line, rec)
                key = next((k for k in keys if k in rec), None)
                if key is None:
                    raise InputError(f"{path}:{line}: {label or noun} {rid!r} has no {noun} "
                                     f"(expected one of {list(keys)})")
                text = rec[key]
            if not isinstance(text, str):
                raise InputError(f"{path}:{line}: {noun} of {rid!r} must be a string, got "
                                 f"{type(text).__name__}")
            rid = str(rid)
            if rid in out:
                raise InputError(f"{path}:{line}: duplicate {id_name} {rid!r} (first at line "
                                 f"{lines[rid]})")
        except InputError as exc:
            _bad_record(path, line, exc, on_bad)
            continue
        out[rid], lines[rid] = text, line
    if not out:
        raise InputError(f"{path}: no {noun}s in the file")
    return out


def load_captions(path, on_bad=None):
    """Captions file -> ``{id: caption}``. JSONL or JSON array of ``{"id", "caption"}`` (id keys
    also ``image_id``/``question_id``, caption keys also ``text``/``answer``, as written by LLaVA's
    evaluation scripts), or a JSON object ``{id: caption}``. Ids are compared as strings.
    ``on_bad(line, reason)``: a malformed record is reported there and skipped (else it raises
    :class:`InputError`)."""
    return text_records(path, "caption", lambda line, rec: _record_id(path, line, rec, "caption"),
                        _CAPTION_KEYS, label="caption record", on_bad=on_bad)


def load_ground_truth(path):
    """Ground-truth file -> ``{id: [object, ...]}``. JSONL or JSON array of
    ``{"id", "objects": [...]}`` (other keys ignored), or a JSON object ``{id: [objects]}``."""
    out, lines = {}, {}
    for line, rec in _iter_json_items(path, "ground-truth"):
        if isinstance(rec, tuple):
            gid, objs = rec
        else:
            gid = _record_id(path, line, rec, "ground-truth")
            if "objects" not in rec:
                raise InputError(f"{path}:{line}: ground-truth record {gid!r} has no 'objects' list")
            objs = rec["objects"]
        if not isinstance(objs, list) or not all(isinstance(o, str) for o in objs):
            raise InputError(f"{path}:{line}: objects of {gid!r} must be a list of strings")
        if gid in out:
            raise InputError(f"{path}:{line}: duplicate id {gid!r} (first at line {lines[gid]})")
        out[gid], lines[gid] = objs, line
    if not out:
        raise InputError(f"{path}: no ground-truth records in the file")
    return out
