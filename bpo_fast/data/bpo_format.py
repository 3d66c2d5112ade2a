"""The official BPO release format, read directly as preference pairs.

The paper's data (arXiv 2403.08730, the released ``bpo_*.json``) is a JSON array of::

    {"prompt": "What is on the table?\\n<image>",
     "image": "coco/train2017/000000123456.jpg",
     "completions": [{"score": 1, "response": "A red cup.", "type": "gt"},
                     {"score": 0, "response": "A blue cup.", "type": "mllm-hal"},
                     {"score": 0, "response": "A red plate.", "type": "llm-hal"}]}

Every two completions whose scores differ make one pair, the higher score chosen (the official
trainer pairs them the same way). Read as the official trainer (``make_batch_pairs``) reads it:
only ``prompt``, ``image``, ``completions[].score`` (a finite number: the official
``bootstrap_dpo.py`` writes floats) and ``completions[].response`` are required. ``type`` of the
rejected answer, where there is one, gives our ``strategy``: ``mllm-hal`` (the model's answer on
the weakened image) -> ``image_weakened``, ``llm-hal`` (the LLM's error injection) ->
``error_injection`` (``injector`` "llm"); a rejected ``gt`` answer (only when a record scores two
references differently) is kept as ``error_injection`` with ``injector`` null; any other value
(``gt-rephrased``, ...) is kept as a strategy of its own name, and a completion without a
``type`` gives the strategy ``untyped``. Pair ids: ``<record id>:<i>-<j>`` (completion indices,
chosen first), the record id being its ``id`` field or ``bpo<index>`` (position in the file).

:func:`iter_pair_records` yields pair records from any file ``train`` / ``ref-logps`` /
``merge-pairs`` accept: our pair JSONL, or official records (JSON array or JSONL), mixed freely.
"""

import math
import os

from bpo_fast.data.schema import IMAGE_PLACEHOLDER

__all__ = ["TYPE_TO_STRATEGY", "is_official_record", "official_to_pairs", "iter_pair_records",
           "convert"]

TYPE_TO_STRATEGY = {"mllm-hal": ("image_weakened", None), "llm-hal": ("error_injection", "llm"),
                    "gt": ("error_injection", None)}
UNTYPED = "untyped"   # the strategy of a rejected completion without a ``type``


def _strategy(completion_type):
    """(strategy, injector) of a rejected completion's ``type`` (see the module docstring)."""
    if completion_type is None:
        return UNTYPED, None
    return TYPE_TO_STRATEGY.get(completion_type, (completion_type, None))


def is_official_record(rec):
    return isinstance(rec, dict) and "completions" in rec


def official_to_pairs(rec, index=0):
    """Pair records (our schema) of one official record; ``ValueError`` naming the field when the
    record is malformed. A record whose completions all score the same gives no pair."""
    if not isinstance(rec, dict):
        raise ValueError(f"record: expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.replace(IMAGE_PLACEHOLDER, "").strip():
        raise ValueError("prompt: expected a non-empty question string")
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError("image: expected a path string or null")
    if image is not None and IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER + "\n" + prompt  # LLaVA's rule: the image comes first
    comps = rec.get("completions")
    if not isinstance(comps, list) or len(comps) < 2:
        raise ValueError("completions: expected a list of at least two completions")
    for i, c in enumerate(comps):
        if not isinstance(c, dict):
            raise ValueError(f"completions[{i}]: expected an object")
        s = c.get("score")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"completions[{i}].score: expected a finite number, got {s!r}")
        if not isinstance(c.get("response"), str) or not c["response"].strip():
            raise ValueError(f"completions[{i}].response: expected a non-empty string")
        t = c.get("type")
        if t is not None and (not isinstance(t, str) or not t.strip()):
            raise ValueError(f"completions[{i}].type: expected a name (e.g. "
                             f"{', '.join(sorted(TYPE_TO_STRATEGY))}) or no type, got {t!r}")
    sid = rec.get("id")
    sid = str(sid) if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid) \
        else f"bpo{index}"
    turns = [{"from": "human", "value": prompt}]
    pairs = []
    for i in range(len(comps)):
        for j in range(i + 1, len(comps)):
            a, b = comps[i], comps[j]
            if a["score"] == b["score"]:
                continue
            (ci, c), (ri, r) = ((i, a), (j, b)) if a["score"] > b["score"] else ((j, b), (i, a))
            strategy, injector = _strategy(r.get("type"))
            pairs.append({
                "id": f"{sid}:{ci}-{ri}", "image": image, "prompt": turns,
                "chosen": c["response"].strip(), "rejected": r["response"].strip(),
                "strategy": strategy, "noise_step": None, "injector": injector,
                "source": {"format": "bpo", "type": r.get("type"),
                           "chosen_type": c.get("type"), "scores": [c["score"], r["score"]]},
            })
    return pairs


def _iter_raw(path):
    """(line, record or ValueError) of a JSON array or a JSONL file."""
    from bpo_fast.data.jsonl import MalformedRecord, iter_records

    for _, line, rec in iter_records(path):
        if isinstance(rec, MalformedRecord):
            rec = ValueError(f"malformed JSON ({rec})")
        yield line, rec


def iter_pair_records(path, counts=None):
    """Yield ``(line, pair record or ValueError)`` for every pair of ``path``: pair records as
    they are (the caller validates them), official records expanded into their pairs (a
    malformed one yields its ``ValueError``; one without differing scores yields nothing).
    ``counts["records"]``, when given, counts the records read (not the pairs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: {path!r} is not a file")
    index = 0
    for line, rec in _iter_raw(path):
        if counts is not None:
            counts["records"] = counts.get("records", 0) + 1
        if is_official_record(rec):
            try:
                for pair in official_to_pairs(rec, index):
                    yield line, pair
            except ValueError as exc:
                yield line, ValueError(f"BPO record: {exc}")
        else:
            yield line, rec
        index += 1


def convert(inputs, out, *, strict=False):
    """Write our pair JSONL from official BPO files and/or pair files (atomic). Returns the
    counts: ``{"records", "pairs", "no_pair", "invalid", "duplicates", "by_strategy"}``;
    ``invalid`` lists ``(file, line, reason)``. ``strict``: an invalid record raises
    ``ValueError`` naming its file and line, and nothing is written."""
    from bpo_fast.errors import FILE, CommandGuard

    with CommandGuard("convert", inputs=[("inputs", p, FILE) for p in inputs],
                      outputs=[("out", out, FILE)]):
        return _convert(inputs, out, strict)


def _convert(inputs, out, strict):
    from bpo_fast.data.jsonl import atomic_write_jsonl
    from bpo_fast.data.schema import SchemaError, validate_pair

    counts = {"records": 0, "pairs": 0, "no_pair": 0, "invalid": [], "duplicates": 0,
              "by_strategy": {}}
    seen, pairs = set(), []
    for path in inputs:
        index = 0
        for line, rec in _iter_raw(path):
            counts["records"] += 1
            if isinstance(rec, Exception):
                counts["invalid"].append((path, line, str(rec)))
                continue
            try:
                if is_official_record(rec):
                    got = official_to_pairs(rec, index)
                elif isinstance(rec, dict) and "conversations" in rec:
                    raise ValueError("a LLaVA conversation record has no rejected answer; make "
                                     "pairs from it with `bpo-fast build-pairs`")
                else:
                    validate_pair(rec)
                    got = [rec]
            except (ValueError, SchemaError) as exc:
                counts["invalid"].append((path, line, str(exc)))
                continue
            finally:
                index += 1
            if not got:
                counts["no_pair"] += 1
            for p in got:
                if p["id"] in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(p["id"])
                pairs.append(p)
                counts["by_strategy"][p["strategy"]] = counts["by_strategy"].get(p["strategy"], 0) + 1
    if strict and counts["invalid"]:
        f, n, r = counts["invalid"][0]
        raise ValueError(f"{f}:{n}: {r} ({len(counts['invalid'])} invalid record(s); nothing "
                         "written)")
    counts["pairs"] = atomic_write_jsonl(out, pairs)
    return counts


def dumps_counts(counts):
    by = ", ".join(f"{k}: {v}" for k, v in sorted(counts["by_strategy"].items())) or "none"
    lines = [f"{counts['records']} record(s) -> {counts['pairs']} pair(s) ({by}); "
             f"records: {counts['no_pair']} without differing scores, "
             f"{len(counts['invalid'])} invalid; pairs: {counts['duplicates']} with a repeated "
             "id dropped"]
    for f, n, r in counts["invalid"][:5]:
        lines.append(f"  {f}:{n}: {r}")
    return "\n".join(lines)
