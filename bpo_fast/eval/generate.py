"""A model's answers to questions about images, for ``eval-chair`` / ``eval-pope`` (``bpo-fast
generate``).

Python API::

    from bpo_fast.eval.generate import GenerateOptions, generate
    summary = generate(GenerateOptions(model="runs/bpo", data="eval.json", image_root="imgs/",
                                       out="answers.jsonl"))

The model is a ``save_pretrained`` folder (a trained ``--output``, ``--merge-lora`` included, or a
base model), or a LoRA adapter folder written by ``train --lora-r`` (its base from
``--base-model`` or the adapter's own record; merged for generation). The questions come from
LLaVA records, preference pairs, question files (POPE) or a folder of images with one prompt
(:mod:`bpo_fast.data.questions`). Each answer is one JSON line ``{"id", "question_id", "image",
"question", "answer"}`` (``image_id`` too for question files): ``eval-chair --captions`` reads
``id`` and ``answer``, ``eval-pope --answers`` reads ``question_id`` and ``answer``.

Generation is :class:`bpo_fast.data.vlm_generation.Answerer` (the path the demo's evaluation and
``train --eval-generate`` take too): the family's chat template and processor, left-padded
batches, greedy or sampled with one random stream per question (from ``--seed`` and its id), so
an answer does not depend on the batch it was in, the number of ranks, or a resume.

Faults: answers are appended batch by batch (one write, flush, fsync); ``--resume`` cuts a torn
last line and skips the ids already written. Bad samples follow the one policy of every command
(:mod:`bpo_fast.data.bad_samples`): a malformed record, an empty question, an image that does not
decode, a question the model's family or its processor cannot take (PaliGemma: none or several
images) is named in the errors file (``<out stem>.errors.jsonl``, with the bpo-fast header: file,
record id, line, reason, kind), skipped and counted; more than ``--max-bad-fraction`` of the
questions bad stops the run (exit 2). Under ``torchrun`` rank r answers questions r, r + W, ...
into ``<out stem>.rank{r}.jsonl`` (its errors into ``<out stem>.errors.rank{r}.jsonl``); at the
end rank 0 merges the shards (and, on ``--resume``, the earlier ``--out`` and errors file) into
``--out`` and the errors file in input order (atomic), removes them, and judges the share of bad
samples over all ranks.
"""

import dataclasses
import os
import time
from dataclasses import dataclass, field

from bpo_fast.data.questions import DEFAULT_PROMPT, INPUT_FORMATS, read_questions
from bpo_fast.errors import UserError, input_dir, input_file, output_file
from bpo_fast.options import (device_option, dtype_option, max_bad_fraction_option, option,
                              processor_kwargs_option, threads_option)

__all__ = ["GenerateOptions", "GenerateSummary", "generate", "merge_shards", "load_model"]
_IO, _GEN, _RUN = "input and output", "generation", "runtime"


@dataclass
class GenerateOptions:
    """The options of ``bpo-fast generate`` (fields without help are Python-API only)."""

    model: str = option(None, help="the model: a save_pretrained folder (train's --output, a "
                                   "base model) or a LoRA adapter folder (train --lora-r)",
                        metavar="DIR", group=_IO, required=True)
    base_model: str = option(None, help="the base model of a LoRA adapter --model",
                             metavar="DIR", group=_IO,
                             default_text="the adapter's base_model_name_or_path")
    data: str = option(None, help="the questions: LLaVA records (JSON/JSONL), preference pairs "
                                  "(what train reads), or a question file (JSONL of "
                                  "{question_id, image or image_id, question or text}: POPE)",
                       metavar="FILE", group=_IO,
                       default_text="every image of --image-root, asked --prompt")
    data_format: str = option("auto", help="reader of --data (auto: from its first record)",
                              choices=INPUT_FORMATS, group=_IO)
    image_root: str = option(None, help="directory the image paths (and question files' "
                                        "image_ids) are relative to; without --data: the images "
                                        "to answer about", metavar="DIR", group=_IO)
    prompt: str = option(DEFAULT_PROMPT, help="the question asked about each image of "
                                              "--image-root when there is no --data",
                         metavar="TEXT", group=_IO)
    turns: str = option("first", help="LLaVA records: answer the first question, or every "
                                      "question (the turns before it as history)",
                        choices=("first", "all"), group=_IO)
    out: str = option(None, help="output JSONL, one {id, question_id, image, question, answer} "
                                 "a line (eval-chair and eval-pope read it); under torchrun the "
                                 "ranks write <stem>.rank{r}.jsonl and rank 0 merges them here",
                      metavar="FILE", group=_IO, required=True)
    errors: str = option(None, help="errors JSONL: each bad sample (file, record id, line, "
                                    "reason, kind) after a bpo-fast header line; under torchrun "
                                    "the ranks write <stem>.rank{r}.jsonl and rank 0 merges "
                                    "them here", metavar="FILE", group=_IO,
                         default_text="<out stem>.errors.jsonl")
    max_bad_fraction: float = max_bad_fraction_option(group=_IO)
    limit: int = option(None, help="answer only the first N questions (before sharding)",
                        metavar="N", group=_IO)
    resume: bool = option(False, help="continue an interrupted run: drop a torn last line, skip "
                                      "the ids already answered", group=_IO)
    overwrite: bool = option(False, help="start over if --out exists", group=_IO)

    max_new_tokens: int = option(256, help="answer length cap", group=_GEN)
    do_sample: bool = option(False, help="sample instead of greedy decoding (each question "
                                         "from its own seed: the same answers at any batch "
                                         "size, rank count or resume)", cli="sample",
                             group=_GEN)
    temperature: float = option(1.0, help="sampling temperature", group=_GEN)
    top_p: float = option(1.0, help="nucleus sampling", group=_GEN)
    seed: int = option(0, help="with each question's id, seeds its sampling", group=_GEN)
    chat_template: str = option(None, help="a Jinja chat template, or a file holding one",
                                metavar="TEMPLATE", group=_GEN,
                                default_text="the processor's own, else the model family's "
                                             "documented default (bpo_fast.models.vlm)")
    processor_kwargs: dict = processor_kwargs_option(group=_GEN)
    min_new_tokens: int = 0        # answer length floor (Python API)

    batch_size: int = option(16, help="questions per generate call; output is appended and "
                                      "fsynced per batch", group=_RUN)
    device: str = device_option(group=_RUN)
    dtype: str = dtype_option(group=_RUN)
    threads: int = threads_option(group=_RUN)
    progress: bool = option(True, help="no progress bar", cli="no-progress", group=_RUN)
    fsync: bool = option(True, help="flush without fsync per batch", cli="no-fsync", group=_RUN)
    rank: int = None               # default: $RANK or 0
    world_size: int = None         # default: $WORLD_SIZE or 1


@dataclass
class GenerateSummary:
    out: str
    errors_path: str
    rank: int
    world_size: int
    questions: int = 0             # this rank's questions
    written: int = 0
    already_done: int = 0          # skipped by --resume
    bad_samples: int = 0           # named in errors_path (this rank's; all ranks' once merged)
    bad_kinds: dict = field(default_factory=dict)   # kind (record, prompt, image, processor) -> n
    generated_tokens: int = 0
    torn_bytes_dropped: int = 0
    renamed_duplicate_ids: int = 0
    oom_splits: int = 0
    elapsed_s: float = 0.0
    setup_s: float = 0.0
    merged: int = None             # lines of --out after rank 0's merge (torchrun)

    def to_dict(self):
        return dataclasses.asdict(self)

    def format(self):
        rate = self.written / self.elapsed_s if self.elapsed_s else 0.0
        tok = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        errs = self.bad_samples
        lines = [f"answers written: {self.written} of {self.questions} questions -> {self.out}",
                 f"already done (resume): {self.already_done}, bad samples: {errs}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.bad_kinds.items()))}) "
                    f"-> {self.errors_path}" if errs else ""),
                 f"time: {self.elapsed_s:.1f}s (+{self.setup_s:.1f}s setup), {rate:.2f} "
                 f"answers/s, {tok:.1f} generated tok/s"]
        if self.torn_bytes_dropped:
            lines.append(f"resume: dropped a torn last line ({self.torn_bytes_dropped} bytes)")
        if self.renamed_duplicate_ids:
            lines.append(f"questions with a repeated id, renamed <id>#<n>: "
                         f"{self.renamed_duplicate_ids}")
        if self.oom_splits:
            lines.append(f"batches halved after CUDA out-of-memory: {self.oom_splits} (a smaller "
                         "--batch-size avoids the retries)")
        if self.merged is not None:
            lines.append(f"merged the ranks' answers: {self.merged} lines in {self.out}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

def load_model(opts, device, dtype):
    """``(model, processor)`` of ``--model``: a save_pretrained folder, or a LoRA adapter merged
    into its base (``--base-model``, else the base the adapter names)."""
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    path = opts.model
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        if opts.base_model:
            raise UserError(f"--base-model: {path!r} is not a LoRA adapter folder (no "
                            "adapter_config.json); --base-model is only for adapters")
        _check_model_dir(path, "--model")
        return load_vlm(path, dtype=dtype, device=device).eval(), load_processor(path)
    from peft import PeftModel

    adapter = _check_model_dir(path, "--model", "adapter_config.json", _ADAPTER_WEIGHTS)
    base = opts.base_model or adapter.get("base_model_name_or_path")
    if not isinstance(base, str) or not os.path.isdir(base):
        raise UserError(f"--base-model: the adapter {path!r} was trained on {base!r}, which is "
                        "not a directory here; pass --base-model DIR")
    _check_model_dir(base, "--base-model")
    model = load_vlm(base, dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, path).merge_and_unload().eval()
    # train saves the processor beside the adapter; an adapter without one uses the base's
    has_processor = any(os.path.isfile(os.path.join(path, f))
                        for f in ("processor_config.json", "preprocessor_config.json",
                                  "tokenizer_config.json"))
    return model, load_processor(path if has_processor else base)


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _check_model_dir(path, arg, config="config.json", weights=_WEIGHTS):
    """The folder's ``config`` as a dict, after checking it is a JSON object and that the
    folder holds weights: a folder that is not a model ends in one line, not a library's
    traceback."""
    import json

    cfg = os.path.join(path, config)
    if not os.path.isfile(cfg):
        raise UserError(f"{arg}: {path!r} holds no {config} (expected a save_pretrained "
                        "model folder, or a LoRA adapter folder for --model)")
    try:
        with open(cfg, encoding="utf-8") as f:
            rec = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{arg}: {cfg!r} is not valid JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{arg}: {cfg!r} is not a JSON object")
    if config == "config.json" and isinstance(rec.get("model_type"), str):
        from bpo_fast.models.vlm import get_adapter

        # a family we cannot run is named from its config alone, before anything else is
        # asked of the folder: the adapter registry's rule, as load_vlm applies it
        get_adapter(rec["model_type"])
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise UserError(f"{arg}: {path!r} holds {config} but no weights (expected one of "
                        f"{', '.join(weights)})")
    return rec


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def shard_path(out, rank, world_size):
    from bpo_fast.data.pair_builder import shard_path as _shard

    return _shard(out, rank, world_size)


def _errors_path(opts):
    from bpo_fast.data.pair_builder import errors_path

    return opts.errors or errors_path(opts.out)


def _validate(opts):
    """``opts`` checked; returns them with ``processor_kwargs`` and ``max_bad_fraction`` in
    their canonical form."""
    if not isinstance(opts, GenerateOptions):
        raise TypeError(f"options: expected GenerateOptions, got {type(opts).__name__}")
    if not opts.model or not opts.out:
        raise ValueError("model and out: required")
    from bpo_fast.data.bad_samples import check_max_bad_fraction
    from bpo_fast.options import check_processor_kwargs

    opts = dataclasses.replace(
        opts, processor_kwargs=check_processor_kwargs(opts.processor_kwargs) or None,
        max_bad_fraction=check_max_bad_fraction(opts.max_bad_fraction))
    input_dir(opts.model, "--model", what="model directory (a save_pretrained or adapter folder)")
    if opts.base_model:
        input_dir(opts.base_model, "--base-model", what="base model directory")
    if opts.data is None:
        if opts.image_root is None:
            raise UserError("--data or --image-root: give the questions (--data FILE) or a "
                            "folder of images to describe (--image-root DIR)")
    elif not os.path.isdir(opts.data):
        input_file(opts.data, "--data", what="questions file (JSON/JSONL, Parquet, Arrow)",
                   text=os.path.splitext(opts.data)[1].lower() not in (".parquet", ".arrow"))
    if opts.image_root is not None:
        input_dir(opts.image_root, "--image-root", what="image directory")
    if opts.data_format not in INPUT_FORMATS:
        raise ValueError(f"data_format: expected one of {list(INPUT_FORMATS)}, got "
                         f"{opts.data_format!r}")
    if opts.turns not in ("first", "all"):
        raise ValueError(f"turns: expected 'first' or 'all', got {opts.turns!r}")
    for name in ("batch_size", "max_new_tokens"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if opts.limit is not None and (isinstance(opts.limit, bool) or not isinstance(opts.limit, int)
                                   or opts.limit < 1):
        raise ValueError(f"limit: expected an int >= 1 or None, got {opts.limit!r}")
    from bpo_fast.data.generation import check_sampling

    check_sampling(opts)
    if opts.resume and opts.overwrite:
        raise ValueError("resume and overwrite: pick one")
    output_file(opts.out, "--out")
    output_file(_errors_path(opts), "--errors")
    return opts


def _data_name(opts):
    """The file the bad samples are counted in (and named by): ``--data``, else the folder."""
    return opts.data if opts.data is not None else opts.image_root


def _guard(opts):
    """The command guard of a run (:class:`bpo_fast.errors.CommandGuard`): this rank's answers
    and errors files (and, for rank 0 under torchrun, the merged ``--out``) against every path
    it reads; each locked."""
    from bpo_fast.errors import DIR, FILE, ROOT, CommandGuard
    from bpo_fast.options import config_file_of
    from bpo_fast.runtime import dist_env

    rank, world, _ = dist_env(opts.rank, opts.world_size)
    outputs = [("--out", shard_path(opts.out, rank, world), FILE),
               ("--errors", shard_path(_errors_path(opts), rank, world), FILE)]
    if world > 1 and rank == 0:     # rank 0 merges the shards into --out and the errors file
        outputs += [("--out", opts.out, FILE), ("--errors", _errors_path(opts), FILE)]
    inputs = [("--model", opts.model, DIR), ("--base-model", opts.base_model, DIR),
              ("--data", opts.data, None), ("--image-root", opts.image_root, ROOT),
              ("--config", config_file_of(opts), FILE)]
    return CommandGuard("generate", inputs=inputs, outputs=outputs)


def _stopped_at(run):
    """Where an interrupted or failed run stopped, what it kept, how to resume."""
    from bpo_fast.errors import appended_status

    started = run is not None and hasattr(run, "writer")
    return appended_status(run.out if started else None, run.summary.written if started else 0,
                           "answer")


class _Run:
    def __init__(self, opts, model=None, processor=None):
        from bpo_fast.data.bad_samples import BadSamples
        from bpo_fast.runtime import dist_env

        self.opts = opts
        self.t0 = time.perf_counter()
        self.rank, self.world, local_rank = dist_env(opts.rank, opts.world_size)
        self.out = shard_path(opts.out, self.rank, self.world)
        self.errors_path = shard_path(_errors_path(opts), self.rank, self.world)
        self.summary = GenerateSummary(out=self.out, errors_path=self.errors_path,
                                       rank=self.rank, world_size=self.world)
        self._check_out()               # before the (slow) model load
        read_bad = []
        self.questions, self.summary.renamed_duplicate_ids = read_questions(opts, read_bad.append)
        self.file = _data_name(opts)
        # the policy, judged against the whole file on every rank: each rank reads every
        # record (the records and questions left out when reading are noted by each, once in
        # the merged file) and answers a share, so its count never exceeds the merged one and
        # a rank stops only where the merged run would; the exact share over all ranks is
        # judged after the merge (merge_shards)
        self.bad = BadSamples(self.errors_path, "generate", max_fraction=opts.max_bad_fraction,
                              resume=opts.resume, arg="--errors", rank=self.rank)
        self.bad.total(self.file, len(self.questions) + len(read_bad))
        self.bad.note(read_bad)
        try:
            self.bad.check()            # too many bad records: before the model loads
            self._load(model, processor, local_rank)
        except BaseException:
            self.bad.close()
            raise

    def _load(self, model, processor, local_rank):
        from bpo_fast.runtime import parse_dtype, resolve_device

        opts = self.opts
        if model is None:
            self.device = resolve_device(opts.device, local_rank)
            self.dtype = parse_dtype(opts.dtype, self.device)
            model, processor = load_model(opts, self.device, self.dtype)
        else:
            p = next(model.parameters())
            self.device, self.dtype = p.device, p.dtype
        from bpo_fast.data.generation import derive_seed
        from bpo_fast.data.vlm_generation import Answerer

        self.derive_seed = derive_seed
        self.answer = Answerer(model, processor, opts, device=self.device, dtype=self.dtype,
                               processor_kwargs=opts.processor_kwargs)
        self._open()

    # -- files -------------------------------------------------------------------------------
    def _check_out(self):
        from bpo_fast.data.bad_samples import check_side_file

        o = self.opts
        targets = [self.out] + ([o.out] if self.world > 1 else [])
        for path in targets:
            if os.path.exists(path) and os.path.getsize(path) > 0 and not (o.resume or o.overwrite):
                raise UserError(f"--out: {path} exists; pass --resume to continue it or "
                                "--overwrite to start over")
        for path in targets:    # before any is cut, appended to or removed
            _check_own(path)
        # the errors files by their header (the merged one is rank 0's to replace)
        for path in [self.errors_path] + ([_errors_path(o)] if self.world > 1 else []):
            check_side_file(path, "--errors")

    def _open(self):
        from bpo_fast.data.jsonl import JsonlWriter, read_ids, repair_torn_tail

        o, s = self.opts, self.summary
        if not o.resume and os.path.exists(self.out):
            # a fresh run (--overwrite): an earlier run's answers must not mix in
            os.remove(self.out)           # generate's own (checked by _check_out)
        done = set()
        if o.resume:
            s.torn_bytes_dropped = repair_torn_tail(self.out)
            done = read_ids(self.out)
            if self.world > 1:     # an earlier run's merged answers
                done |= read_ids(o.out)
        mine = [q for i, q in enumerate(self.questions) if i % self.world == self.rank]
        s.questions = len(mine)
        self.todo = [q for q in mine if q.id not in done]
        s.already_done = len(mine) - len(self.todo)
        self.writer = JsonlWriter(self.out, fsync=o.fsync)

    def _entry(self, q, exc):
        from bpo_fast.data.bad_samples import BadSamples, sample_kind

        return BadSamples.entry(self.file, q.id, q.line, f"{type(exc).__name__}: {exc}",
                                sample_kind(exc))

    # -- images ------------------------------------------------------------------------------
    def _images(self, q):
        from bpo_fast.data.images import open_image

        if q.load is not None:
            return q.load()
        return [open_image(p, self.opts.image_root)[0] for p in q.images]

    def _batch_items(self, batch):
        """``(items, kept questions, bad-sample notes by position in the batch)``: a question
        whose images do not load is noted and left out."""
        from bpo_fast.data.bad_samples import SAMPLE_ERRORS

        items, kept, notes = [], [], []
        for pos, q in enumerate(batch):
            try:
                images = self._images(q)
            except SAMPLE_ERRORS as exc:  # an unreadable image never stops the run
                notes.append((pos, self._entry(q, exc)))
                continue
            items.append((q.turns, images))
            kept.append((pos, q))
        return items, kept, notes

    # -- main --------------------------------------------------------------------------------
    def run(self):
        from bpo_fast.runtime import adapt_threads

        o, s = self.opts, self.summary
        s.setup_s = time.perf_counter() - self.t0
        t0 = time.perf_counter()
        bar = None
        if o.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=s.questions, initial=s.already_done, unit="answer",
                       desc="generate" + (f"[{self.rank}/{self.world}]" if self.world > 1 else ""),
                       dynamic_ncols=True)
        try:
            for b in range(0, len(self.todo), o.batch_size):
                batch = self.todo[b:b + o.batch_size]
                items, kept, notes = self._batch_items(batch)
                seeds = [self.derive_seed(o.seed, q.id, "generate") for _, q in kept]
                # a question the family or the processor cannot take: noted, left out
                answers, ntok = self.answer(
                    items, seeds if o.do_sample else None,
                    on_bad=lambda i, exc: notes.append((kept[i][0], self._entry(kept[i][1], exc))))
                done = [(q, a) for (_, q), a in zip(kept, answers) if a is not None]
                self.writer.write_batch([{"id": q.id, "question_id": q.id, **q.extra,
                                          "question": q.text, "answer": a} for q, a in done])
                # after the answers; in question order (a rank's file as a single run's)
                self.bad.note([e for _, e in sorted(notes, key=lambda n: n[0])])
                s.written += len(done)
                s.generated_tokens += ntok
                if bar is not None:
                    bar.update(len(batch))
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix({"tok/s": f"{s.generated_tokens / el:.1f}"}, refresh=False)
                self.bad.check()
                adapt_threads()
        finally:
            if bar is not None:
                bar.close()
            self.writer.close()
            self.bad.close()
            self._count_bad(self.bad)
        s.oom_splits = self.answer.oom_splits
        s.elapsed_s = time.perf_counter() - t0
        return s

    def _count_bad(self, bad):
        self.summary.bad_samples = bad.count(self.file)
        self.summary.bad_kinds = dict(bad.by_kind.get(self.file, {}))


def _check_own(path):
    # --resume cuts and appends, --overwrite removes: only ever a file generate wrote
    from bpo_fast.data.jsonl import check_own_jsonl

    check_own_jsonl(path, "--out", "generate", _own_record, _OWN_PREFIXES)


# the first bytes of every answer line generate writes (dumps_line: compact, keys in order)
_OWN_PREFIXES = (b'{"id":',)


def _own_record(rec):
    return {"answer", "question_id"} <= set(rec)


def merge_shards(opts, questions=None, world_size=None, total=None, summary=None):
    """Rank 0's last step under torchrun: the ranks' ``<stem>.rank{r}.jsonl`` (and, on resume,
    the earlier ``--out``) -> ``--out`` in question order, and their errors files (and, on
    resume, the earlier one) -> the errors file (header, each entry once), both written
    atomically; the shards are removed after. Then the bad-sample policy over all ranks: more
    than ``opts.max_bad_fraction`` of the ``total`` questions (the file's questions and the
    records and questions left out when reading) raises
    :class:`~bpo_fast.data.bad_samples.TooManyBadSamples` naming the merged errors file.
    Returns the number of answer lines written; ``summary`` (a :class:`GenerateSummary`), when
    given, gets the merged counts."""
    from bpo_fast.data.jsonl import atomic_write_jsonl, iter_jsonl

    world = world_size or opts.world_size
    if questions is None:
        read_bad = []
        questions, _ = read_questions(opts, read_bad.append)
        total = len(questions) + len(read_bad)
    order = {q.id: i for i, q in enumerate(questions)}
    shards = [shard_path(opts.out, r, world) for r in range(world)]
    sources = ([opts.out] if opts.resume and os.path.exists(opts.out) else []) + \
        [p for p in shards if os.path.exists(p)]
    by_id = {}
    for p in sources:
        for _, rec in iter_jsonl(p):
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                by_id.setdefault(rec["id"], rec)
    recs = sorted(by_id.values(), key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    n = atomic_write_jsonl(opts.out, recs)
    bad = _merge_errors(opts, world, order, total if total is not None else len(questions))
    for p in shards:
        if os.path.exists(p):
            os.remove(p)
    if summary is not None:
        summary.merged, summary.errors_path = n, bad.path
        summary.bad_samples = bad.count(_data_name(opts))
        summary.bad_kinds = dict(bad.by_kind.get(_data_name(opts), {}))
    try:
        bad.check()
    finally:
        bad.close()
    return n


def _merge_errors(opts, world, order, total):
    """The ranks' errors files (and, on resume, the merged one) -> the merged errors file:
    read-time entries (records, dropped questions) by line, then the questions' in question
    order; each entry once. Returns the policy's counts over it (a :class:`BadSamples` that
    appends to it)."""
    from bpo_fast.data.bad_samples import SIDE_KEY, BadSamples, side_header
    from bpo_fast.data.jsonl import atomic_write_jsonl, iter_jsonl

    path = _errors_path(opts)
    shards = [shard_path(path, r, world) for r in range(world)]
    sources = ([path] if opts.resume and os.path.exists(path) else []) + \
        [p for p in shards if os.path.exists(p)]
    entries, seen = [], set()
    for p in sources:
        for _, e in iter_jsonl(p):
            if isinstance(e, dict) and SIDE_KEY not in e:
                k = (e.get("file"), e.get("id"), e.get("line"), e.get("reason"))
                if k not in seen:
                    seen.add(k)
                    entries.append(e)
    entries.sort(key=lambda e: (1, order[e["id"]], 0) if e.get("id") in order
                 else (0, 0, e.get("line") or 0))
    if entries:
        atomic_write_jsonl(path, [side_header("errors", "generate")] + entries)
    elif os.path.exists(path):
        os.remove(path)   # an earlier run's (its header checked before the run started)
    for p in shards:
        if os.path.exists(p):
            os.remove(p)
    bad = BadSamples(path, "generate", max_fraction=opts.max_bad_fraction, resume=True,
                     arg="--errors")
    bad.total(_data_name(opts), total)
    return bad


def generate(opts, model=None, processor=None):
    """Answer the questions of ``opts`` (:class:`GenerateOptions`); returns a
    :class:`GenerateSummary`. ``model``/``processor``: already loaded (else from
    ``opts.model``). Under torchrun (a process group initialised), the ranks meet at the end
    and rank 0 merges their shards into ``opts.out`` and their errors into the errors file,
    then applies the bad-sample policy to the merged counts (exit 2 from the CLI)."""
    opts = _validate(opts)
    if (model is None) != (processor is None):
        raise ValueError("model and processor: pass both or neither")
    run = None
    with _guard(opts) as guard:
        guard.status = lambda: _stopped_at(run)
        run = _Run(opts, model, processor)
        summary = run.run()
        if run.world > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                verdict = None
                if run.rank == 0:
                    try:
                        merge_shards(opts, run.questions, run.world, run.bad.totals[run.file],
                                     summary=summary)
                    except Exception as exc:  # raised after the barrier: no rank left waiting
                        verdict = exc
                dist.barrier()
                if verdict is not None:
                    raise verdict
        return summary
