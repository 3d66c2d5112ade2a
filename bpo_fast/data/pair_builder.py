"""The BPO preference-pair builder (orchestration): image-weakened prompting and error
injection at scale.

Python API::

    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs
    summary = build_pairs(PairBuilderConfig(model="ckpt/", data="llava.json", image_root="imgs/",
                                            out="pairs.jsonl", noise_steps=(200, 500, 800)))
    print(summary.format())

``build_pairs(config, model=None, processor=None)`` loads the model from ``config.model`` unless
a loaded ``(model, processor)`` is passed (e.g. by ``bpo-fast demo``).

Pipeline, image-weakened: CPU DataLoader workers decode each record's image once and resize/crop
it to the processor geometry (uint8, :mod:`bpo_fast.data.images`); the main process moves the
uint8 batch to the device and makes all noise levels of each image in one
``bpo_fast.diffusion_noise`` call (normalisation fused), then one left-padded, KV-cached
``generate`` per chunk of rows (:mod:`bpo_fast.data.generation`). Decoding of the next batch
overlaps generation of this one. Error injection runs after, in batches, with the rule rewriter
or the model's language backbone (text only).

Randomness: the noise of a record's image and the sampling of each of its answers derive from
(seed, record id, strategy): the same pairs whatever the batch size, world size, or where a run
was interrupted and resumed.

Faults: pairs are appended batch by batch (flush + fsync), so a kill loses at most the batch in
flight; ``resume=True`` cuts a torn last line and skips ids already written (or decided: dropped
answers are logged). Unreadable images and malformed records go to the errors file (JSONL:
stage, reason, line) and the run goes on (``strict``: a malformed record stops it).
Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) rank r takes records
r, r + W, ... and writes ``<out>.rank{r}.jsonl``; ``bpo-fast merge-pairs`` joins the shards.
"""

import argparse
import dataclasses
import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from bpo_fast.data.generation import (Generator, check_sampling, derive_seed, image_token_count,
                                      load_model, pixels_for_levels, schedule_for)
from bpo_fast.data.images import (ImageError, ImageGeometry, ImageLoadDataset, collate_images,
                                  open_image)
from bpo_fast.data.inject import LLMInjector, RuleInjector, load_template
from bpo_fast.data.bad_samples import (ErrorsFile, SampleError, TooManyBadSamples,
                                       check_max_bad_fraction, check_side_file)
from bpo_fast.data.jsonl import JsonlWriter, check_own_jsonl, read_ids, repair_torn_tail
from bpo_fast.data.pair_merge import _split_ext
from bpo_fast.data.llava_format import TURN_MODES, MalformedRecord, iter_records, record_to_samples
from bpo_fast.data.schema import INJECTORS, STRATEGIES, SchemaError, normalize_text, validate_pair
from bpo_fast.errors import UserError, input_dir, input_file, output_file
from bpo_fast.options import (check_processor_kwargs, check_values, config_file_of,
                              device_option, dtype_option, max_bad_fraction_option, option,
                              processor_kwargs_option, threads_option)
from bpo_fast.runtime import (adapt_threads, choose_num_workers, dist_env, parse_dtype,
                              resolve_device)

__all__ = ["PairBuilderConfig", "BuildSummary", "build_pairs", "parse_noise_steps", "shard_path",
           "errors_path"]


def _strategies_arg(s):
    items = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in STRATEGIES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(STRATEGIES)}, "
                                         f"got {s!r}")
    return items


def _noise_steps_arg(s):
    try:
        return parse_noise_steps(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_IO, _ST, _GEN, _RUN = "input and output", "strategies", "generation", "runtime"


@dataclass
class PairBuilderConfig:
    """Everything ``build_pairs`` needs; the options of ``bpo-fast build-pairs`` (fields without
    help are Python-API only)."""

    model: str = option(None, help="saved LLaVA-style model + processor (save_pretrained "
                                   "folder); needed for image_weakened and --injector llm",
                        metavar="DIR", group=_IO)
    data: str = option(None, help="LLaVA-format JSON array or JSONL (id, image, conversations)",
                       metavar="FILE", group=_IO, required=True)
    out: str = option(None, help="output JSONL; under torchrun rank r writes "
                                 "<stem>.rank{r}.jsonl instead", metavar="FILE", group=_IO,
                      required=True)
    image_root: str = option(None, help="directory the records' image paths are relative to",
                             metavar="DIR", group=_IO)
    errors: str = option(None, help="errors JSONL (per shard under torchrun)", metavar="FILE",
                         group=_IO, default_text="<out stem>.errors.jsonl")
    turns: str = option("first", help="answer the first question only, or every gpt turn "
                                      "(earlier turns become the prompt's history)",
                        choices=TURN_MODES, group=_IO)
    limit: int = option(None, help="use only the first N records (before sharding; for a try "
                                   "run)", metavar="N", group=_IO, bounds="[1, inf)")
    resume: bool = option(False, help="continue an interrupted run: drop a torn last line, skip "
                                      "pairs already written or dropped", group=_IO)
    overwrite: bool = option(False, help="start over if --out exists", group=_IO)
    strict: bool = option(False, help="stop at the first malformed record (else it is logged to "
                                      "the errors file with its line number and skipped)",
                          group=_IO)
    summary_json: str = option(None, help="also write the end summary as JSON (per shard under "
                                          "torchrun, like --out)", metavar="FILE",
                               group=_IO)
    max_bad_fraction: float = max_bad_fraction_option(group=_IO)

    strategies: tuple = option(STRATEGIES, help="comma list of image_weakened,error_injection",
                               type=_strategies_arg, metavar="LIST", group=_ST)
    noise_steps: tuple = option((500,), help="diffusion step(s) for image_weakened, e.g. "
                                             "200,500,800: one pair per level, each image "
                                             "decoded once; 'none' = clean image",
                                type=_noise_steps_arg, metavar="LIST", group=_ST)
    noise_schedule: str = option("sigmoid", help="beta schedule of the forward diffusion "
                                                 "(bpo_fast.NoiseSchedule kinds: sigmoid, "
                                                 "linear, cosine, ...)", group=_ST)
    num_noise_steps: int = option(1000, help="length of the noise schedule", metavar="T",
                                  group=_ST, bounds="[1, inf)")
    injector: str = option("rules", help="error injection: 'rules' (deterministic rewriter, no "
                                         "model) or 'llm' (the model's language backbone with "
                                         "our prompt)", choices=INJECTORS, group=_ST)
    inject_template: str = option(None, help="prompt template for --injector llm, with "
                                             "{question} and {answer}", metavar="FILE",
                                  group=_ST,
                                  default_text="bpo_fast/resources/inject_template.txt")
    chat_template: str = option(None, help="a Jinja chat template, or a file holding one",
                                metavar="TEMPLATE", group=_ST,
                                default_text="the processor's own, else the model family's "
                                             "documented default (bpo_fast.models.vlm)")
    lexicon: str = option(None, help="JSON extending the rule injector's lexicon (keys: colors, "
                                     "attributes, spatial, objects, plurals, places)",
                          metavar="FILE", group=_ST)
    max_edits: int = option(2, help="rule injector: at most this many words changed per answer",
                            group=_ST, bounds="[1, inf)")
    rule_vocabulary: list = None   # rule injector: draw replacements only from these words

    max_new_tokens: int = option(256, help="answer length cap", group=_GEN, bounds="[1, inf)")
    min_new_tokens: int = option(0, help="answer length floor", group=_GEN)
    inject_max_new_tokens: int = option(None, help="cap for --injector llm rewrites",
                                        metavar="N", group=_GEN, default_text="--max-new-tokens",
                                        bounds="[1, inf)")
    do_sample: bool = option(True, help="greedy decoding instead of sampling", cli="greedy",
                             negate=True, group=_GEN)
    temperature: float = option(1.0, help="sampling temperature", group=_GEN)
    top_p: float = option(1.0, help="nucleus sampling", group=_GEN)
    seed: int = option(0, help="with each record's id and the strategy, seeds its noise, its "
                               "sampling and the rule injector", group=_GEN)
    processor_kwargs: dict = processor_kwargs_option(group=_GEN)

    device: str = device_option(group=_RUN)
    dtype: str = dtype_option(group=_RUN)
    threads: int = threads_option(group=_RUN)
    batch_size: int = option(32, help="records (images) per batch; output is appended and "
                                      "fsynced per batch", group=_RUN, bounds="[1, inf)")
    gen_batch_size: int = option(None, help="rows per generate call", metavar="N", group=_RUN,
                                 default_text="batch size x noise levels", bounds="[1, inf)")
    num_workers: int = option(None, help="CPU worker processes decoding/resizing images",
                              metavar="N", group=_RUN, bounds="[0, inf)",
                              default_text="4, at most the CPUs this process may use")
    progress: bool = option(True, help="no progress bar", cli="no-progress", group=_RUN)
    fsync: bool = option(True, help="flush without fsync per batch (faster on slow disks; a "
                                    "machine crash may then lose more than one batch)",
                         cli="no-fsync", group=_RUN)
    rank: int = None               # default: $RANK or 0
    world_size: int = None         # default: $WORLD_SIZE or 1
    max_batches: int = None        # stop cleanly after N written batches (tests, dry runs)

    def __post_init__(self):
        check_values(self)  # each value by its declaration: type, finite, bounds, choices


@dataclass
class BuildSummary:
    out: str
    errors_path: str
    rank: int
    world_size: int
    written: dict = field(default_factory=dict)          # strategy -> pairs written
    dropped: dict = field(default_factory=dict)          # reason -> pairs dropped
    errors: dict = field(default_factory=dict)           # stage -> errors logged
    already_done: int = 0                                # pairs skipped by --resume
    torn_bytes_dropped: int = 0
    skipped_no_image: int = 0                            # text-only samples (image_weakened)
    records: int = 0
    samples: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0                               # the run, after setup
    setup_s: float = 0.0                                 # loading the model, reading nothing yet
    timings: dict = field(default_factory=dict)          # decode_wait_s, noise_s, generate_s, ...
    stopped_early: bool = False
    oom_splits: int = 0                                  # generate batches halved on CUDA OOM
    renamed_duplicate_ids: int = 0                       # repeated source ids, made "<id>#<n>"
    first_bad_record: str = None                         # "<data>:<line>: <reason>" of the first

    # the bad-sample policy (bpo_fast.data.bad_samples): records, images and samples the
    # processor rejects, each counted once per record
    BAD_STAGES = ("record", "image", "sample")

    @property
    def bad_samples(self):
        return sum(self.errors.get(k, 0) for k in self.BAD_STAGES)

    @property
    def total_written(self):
        return sum(self.written.values())

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["total_written"] = self.total_written
        d["pairs_per_s"] = self.total_written / self.elapsed_s if self.elapsed_s else None
        return d

    def format(self):
        w = ", ".join(f"{k}={v}" for k, v in sorted(self.written.items())) or "none"
        dr = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        er = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        t = ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items() if v >= 0.005)
        rate = self.total_written / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"pairs written: {self.total_written} ({w}) -> {self.out}",
            f"dropped (rejected empty/equal to chosen): {sum(self.dropped.values())} ({dr})",
            f"errors: {sum(self.errors.values())} ({er})" + (f" -> {self.errors_path}" if sum(self.errors.values()) else ""),
            f"records: {self.records}, samples: {self.samples}, already done (resume): "
            f"{self.already_done}, text-only (no image_weakened): {self.skipped_no_image}",
            f"time: {self.elapsed_s:.1f}s (+{self.setup_s:.1f}s setup), {rate:.2f} pairs/s, generated tokens: "
            f"{self.generated_tokens} ({self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0:.1f}"
            f" tok/s)" + (f"; {t}" if t else ""),
        ]
        if self.torn_bytes_dropped:
            lines.append(f"resume: dropped a torn last line ({self.torn_bytes_dropped} bytes)")
        if self.stopped_early:
            lines.append("stopped early (max_batches)")
        if self.first_bad_record:
            lines.append(f"bad records skipped: {self.errors.get('record', 0)}, the first at "
                         f"{self.first_bad_record} (--strict stops at the first)")
        if self.renamed_duplicate_ids:
            lines.append(f"records with a repeated id, renamed <id>#<n>: {self.renamed_duplicate_ids}")
        if self.oom_splits:
            lines.append(f"generation batches halved after CUDA out-of-memory: {self.oom_splits} "
                         "(a smaller --gen-batch-size avoids the retries)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers


def parse_noise_steps(spec):
    """'200,500,800' -> (200, 500, 800); 'none' (or 'clean') is the no-noise level (None)."""
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    elif isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        raise TypeError(f"noise_steps: expected '200,500,800' or a list, got {type(spec).__name__}")
    out = []
    for s in items:
        if s is None or (isinstance(s, str) and s.lower() in ("none", "clean")):
            v = None
        else:
            try:
                v = int(s)
            except (TypeError, ValueError):
                raise ValueError(f"noise_steps: {s!r} is not an integer or 'none'") from None
            if v < 0:
                raise ValueError(f"noise_steps: expected steps >= 0, got {v}")
        if v in out:
            raise ValueError(f"noise_steps: {s!r} is listed twice")
        out.append(v)
    if not out:
        raise ValueError("noise_steps: expected at least one level")
    return tuple(out)


def shard_path(out, rank, world_size):
    """``pairs.jsonl`` -> ``pairs.rank{r}.jsonl`` when world_size > 1, else ``out`` itself."""
    if world_size <= 1:
        return out
    root, ext = _split_ext(out)
    return f"{root}.rank{rank}{ext}"


def errors_path(out):
    root, _ = _split_ext(out)
    return f"{root}.errors.jsonl"

def _rejection_reason(chosen, rejected):
    if not rejected or not rejected.strip():
        return "empty"
    if normalize_text(rejected) == normalize_text(chosen):
        return "equal"
    return None


# ---------------------------------------------------------------------------------------------
# the builder


class _Run:
    """One build. ``cfg`` comes from :func:`_validate_config` (``noise_steps`` parsed there);
    ``need_model``: whether a strategy generates with the model (:func:`_needs_model`)."""

    def __init__(self, cfg, model, processor, need_model):
        self.cfg = cfg
        self.t0 = time.perf_counter()
        self.rank, self.world, local_rank = dist_env(cfg.rank, cfg.world_size)
        self.out = shard_path(cfg.out, self.rank, self.world)
        # pairs.jsonl -> pairs.errors.rank{r}.jsonl: shard globs (pairs.rank*.jsonl) never catch it
        self.errors_path = shard_path(cfg.errors or errors_path(cfg.out), self.rank, self.world)
        self.summary = BuildSummary(out=self.out, errors_path=self.errors_path, rank=self.rank,
                                    world_size=self.world)
        self.summary.timings = {"decode_wait_s": 0.0, "noise_s": 0.0, "generate_s": 0.0,
                                "inject_s": 0.0, "write_s": 0.0}
        self.levels = cfg.noise_steps
        self._check_out()  # before the (slow) model load
        self.model = self.processor = self.gen = None
        if need_model or processor is not None or model is not None:
            if model is None or processor is None:
                self.device = resolve_device(cfg.device, local_rank)
                self.dtype = parse_dtype(cfg.dtype, self.device)
                model, processor = load_model(cfg.model, self.device, self.dtype)
            else:
                self.device = next(model.parameters()).device
                self.dtype = next(model.parameters()).dtype
            self.model, self.processor = model, processor
            self.gen = Generator(model, processor, cfg, self.device, self.dtype)
        self.rows = None
        if "image_weakened" in cfg.strategies and (model.config.model_type != "llava"
                                                   or cfg.processor_kwargs):
            # not one fixed-size image tensor (tiles, anyres, flattened patches), a prompt the
            # processor expands itself, or processor call arguments (--processor-kwargs, which
            # the fixed geometry of the fast path does not know): the family's processor per
            # row, noise on its pixels
            from bpo_fast.data.vlm_generation import ProcessorRows

            self.gen.chat_template()  # the chat-template rule fails here, not mid-run
            self.rows = ProcessorRows(processor, model.config.model_type,
                                      schedule_for(cfg.noise_schedule, cfg.num_noise_steps),
                                      processor_kwargs=cfg.processor_kwargs)
        elif "image_weakened" in cfg.strategies:
            self.geometry = ImageGeometry.from_processor(processor)
            if self.geometry.output_hw() is None:
                raise ValueError("processor: image_weakened needs a fixed image size (centre crop or "
                                 "exact resize); this processor keeps the aspect ratio")
            self.gen.image_token, self.gen.n_image_tokens = image_token_count(processor, self.geometry)
            if self.gen.n_image_tokens < 1:
                raise ValueError("processor: could not find how many image tokens an image takes")
        if "error_injection" in cfg.strategies:
            if cfg.injector == "rules":
                self.injector = RuleInjector(seed=cfg.seed, lexicon=cfg.lexicon, max_edits=cfg.max_edits,
                                             vocabulary=cfg.rule_vocabulary)
            else:
                tpl = load_template(cfg.inject_template)
                self.injector = LLMInjector(self._llm_generate, self.gen.text_prompt, tpl)
                self.template_crc = f"{zlib.crc32(tpl.encode()):08x}"
        self.pbar = None
        self._last_postfix = 0.0
        self.batches_written = 0
        self._open_files()  # last: nothing above can leave a file half-prepared

    # -- files -------------------------------------------------------------------------------
    def _check_out(self):
        cfg = self.cfg
        exists = os.path.exists(self.out) and os.path.getsize(self.out) > 0
        if exists and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"out: {self.out} exists; pass resume=True (--resume) to continue "
                                  "it or overwrite=True (--overwrite) to start over")
        # a foreign file at either path is refused before the (slow) model load: the errors
        # file by its header, the pair file by its first record (it has no header: other tools
        # read it)
        check_side_file(self.errors_path, "errors")
        check_own_jsonl(self.out, "--out", "build-pairs",
                        lambda r: {"chosen", "rejected"} <= set(r), (b'{"id":',))

    def _open_files(self):
        cfg, s = self.cfg, self.summary
        if not cfg.resume and cfg.overwrite and os.path.exists(self.out):
            os.remove(self.out)
        self.done = set()
        if cfg.resume:
            s.torn_bytes_dropped = repair_torn_tail(self.out)
            self.done = read_ids(self.out)
        # a fresh run: stale errors of an earlier run (our header on the first line) must not mix
        # with this run's; the file is opened at the first error (a clean run leaves none)
        self.err_file = ErrorsFile(self.errors_path, "build-pairs", resume=cfg.resume,
                                   fsync=cfg.fsync, key=self._error_key)
        for e in self.err_file.existing:
            if e.get("stage") == "dropped" and isinstance(e.get("pair_id"), str):
                self.done.add(e["pair_id"])  # decided: an uninterrupted run drops it too
        self.writer = JsonlWriter(self.out, fsync=cfg.fsync)
        self._drops = []

    @staticmethod
    def _error_key(e):
        return (e.get("stage"), e.get("line"), e.get("source_id"), e.get("reason"),
                e.get("pair_id"))

    def _log_errors(self, errs):
        for e in errs:
            if e["stage"] != "dropped":  # drops are counted in summary.dropped
                self.summary.errors[e["stage"]] = self.summary.errors.get(e["stage"], 0) + 1
        self.err_file.write(errs)  # a resumed run does not log the same error twice

    def _check_bad(self, final=False):
        """The bad-sample policy: more than ``max_bad_fraction`` of the records bad, or (at the
        end) no pair from a run that had records, stops the build with exit 2, the reasons
        counted."""
        s, cfg = self.summary, self.cfg
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "no errors"
        drops = ", ".join(f"rejected answer {k}: {v}" for k, v in sorted(s.dropped.items()))
        where = f"; each is named in {self.errors_path}" if s.errors or s.dropped else ""
        if s.first_bad_record:
            where = f"; the first: {s.first_bad_record}" + where
        if s.records and s.bad_samples > cfg.max_bad_fraction * s.records:
            raise TooManyBadSamples(
                f"build-pairs: {s.bad_samples} of the {s.records} records of {cfg.data} are bad "
                f"(more than --max-bad-fraction {cfg.max_bad_fraction:g}): {reasons}{where}")
        if final and s.records and not s.total_written and not s.already_done \
                and not s.stopped_early:
            why = ", ".join(x for x in (reasons if s.errors else "", drops,
                                        f"text-only (no image_weakened): {s.skipped_no_image}"
                                        if s.skipped_no_image else "") if x)
            raise TooManyBadSamples(f"build-pairs: wrote 0 pairs from {s.records} records of "
                                    f"{cfg.data} ({why or 'nothing to do'}){where}")

    def _write(self, records):
        t = time.perf_counter()
        good, errs = [], []
        for r in records:
            try:
                validate_pair(r)
            except SchemaError as exc:  # never write a record the trainer cannot read
                errs.append({"stage": "output", "line": None, "source_id": r.get("id"),
                             "reason": str(exc)})
                continue
            good.append(r)
        self.writer.write_batch(good)
        for r in good:  # counted once written: a failed write counts nothing
            self.summary.written[r["strategy"]] = self.summary.written.get(r["strategy"], 0) + 1
        # after the pairs: a kill in between only makes a resumed run decide those drops again
        self._log_errors(errs + self._drops)
        self._drops = []
        self.summary.timings["write_s"] += time.perf_counter() - t
        self.batches_written += 1

    def _count_oom(self):
        self.summary.oom_splits += 1

    def _drop(self, reason, smp, pid):
        """A rejected answer that is empty or equals the chosen one: counted, and logged to the
        errors file (stage "dropped") so that a resumed run does not generate it again."""
        self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1
        self._drops.append({"stage": "dropped", "line": smp.line, "source_id": smp.source_id,
                            "pair_id": pid, "reason": f"rejected answer is {reason}"})

    def _stop(self):
        mb = self.cfg.max_batches
        if mb is not None and self.batches_written >= mb:
            self.summary.stopped_early = True
            return True
        return False

    # -- input -------------------------------------------------------------------------------
    def read_samples(self):
        cfg, s = self.cfg, self.summary
        samples, errs = [], []
        # Ids seen over the WHOLE file (all shards): a repeated id (LLaVA mixes have some) gets
        # "#2", "#3", ... in file order, the same on every rank, so pair ids stay unique and
        # stable across runs and world sizes instead of the record being lost.
        seen = {}
        good = 0
        for index, line, rec in iter_records(cfg.data):
            if cfg.limit is not None and index >= cfg.limit:
                break
            raw_id = rec.get("id") if isinstance(rec, dict) else None
            occurrence = 0
            if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
                occurrence = seen[str(raw_id)] = seen.get(str(raw_id), 0) + 1
            if index % self.world != self.rank:
                continue
            s.records += 1
            try:
                got = record_to_samples(rec, turns=cfg.turns, index=index, line=line)
            except MalformedRecord as exc:
                if cfg.strict:
                    raise UserError(f"data: {cfg.data}:{line}: {exc} (without strict / --strict "
                                    "bad records are logged and skipped)") from None
                errs.append({"stage": "record", "line": line, "index": index,
                             "source_id": None if raw_id is None else str(raw_id), "reason": str(exc)})
                continue
            if occurrence > 1:
                s.renamed_duplicate_ids += 1
                for smp in got:
                    smp.source_id = f"{smp.source_id}#{occurrence}"
            samples.extend(got)
            good += 1
        if errs and not good and all(e["reason"].startswith("invalid JSON") for e in errs):
            raise UserError(f"data: no line of {cfg.data!r} is a JSON record (first, line "
                            f"{errs[0]['line']}: {errs[0]['reason']}); expected LLaVA-format "
                            "JSON or JSONL")
        s.samples = len(samples)
        if errs:
            s.first_bad_record = f"{cfg.data}:{errs[0]['line']}: {errs[0]['reason']}"
        self._log_errors(errs)
        self._check_bad()
        return samples

    # -- progress ----------------------------------------------------------------------------
    def _progress(self, n):
        if self.pbar is None:
            return
        self.pbar.update(n)
        now = time.perf_counter()
        if now - self._last_postfix < 0.5:  # formatting per item would slow a big resume
            return
        self._last_postfix = now
        el = max(now - self.t0, 1e-9)
        self.pbar.set_postfix({"pairs/s": f"{self.summary.total_written / el:.2f}",
                               "tok/s": f"{self.summary.generated_tokens / el:.1f}"}, refresh=False)

    # -- image-weakened ----------------------------------------------------------------------
    def image_weakened(self, samples, bad_images):
        cfg = self.cfg
        # One unit per record: its image is decoded once for all its turns and levels.
        units, by_record = [], {}
        for smp in samples:
            if smp.image is None:
                self.summary.skipped_no_image += 1
                continue
            rows = []
            for k, lvl in enumerate(self.levels):
                pid = smp.pair_id("image_weakened", "clean" if lvl is None else lvl)
                if pid in self.done:
                    self.summary.already_done += 1
                    self._progress(1)
                else:
                    rows.append((smp, k, pid))
            if not rows:
                continue
            u = by_record.get(smp.index)
            if u is None:
                u = by_record[smp.index] = {"image": smp.image, "rows": [], "line": smp.line,
                                            "source_id": smp.source_id}
                units.append(u)
            u["rows"].extend(rows)
        if not units:
            return
        if self.rows is not None:
            return self._image_weakened_rows(units, bad_images)
        ds = ImageLoadDataset([(i, u["image"]) for i, u in enumerate(units)], cfg.image_root, self.geometry)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
            collate_fn=collate_images, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            worker_init_fn=_worker_init if cfg.num_workers > 0 else None)
        gen_bs = cfg.gen_batch_size or cfg.batch_size * len(self.levels)
        settings = self.gen.settings()
        settings.update(noise_schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps)
        it = iter(loader)
        t = self.summary.timings
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t["decode_wait_s"] += time.perf_counter() - t0
            if batch is None:
                break
            errs = []
            for key, err in zip(batch["keys"], batch["errors"]):
                if err is not None:
                    u = units[key]
                    bad_images.add(u["image"])
                    errs.append({"stage": "image", "line": u["line"], "source_id": u["source_id"],
                                 "image": u["image"], "reason": err})
                    self._progress(len(u["rows"]))
            self._log_errors(errs)
            good_keys = [batch["keys"][i] for i in batch["good"]]
            if not good_keys:
                continue
            t0 = time.perf_counter()
            u8 = batch["pixels"].to(self.device, non_blocking=True)  # [n, H, W, C] uint8
            # each image's noise from its own seed (seed, record id, strategy): the same in
            # whatever batch, rank or resumed run the record lands
            pix = torch.cat([
                pixels_for_levels(u8[b:b + 1], self.levels, self.geometry, out_dtype=self.dtype,
                                  schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps,
                                  seed=derive_seed(cfg.seed, units[key]["source_id"],
                                                    "image_weakened"), layout="NHWC")
                for b, key in enumerate(good_keys)])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t["noise_s"] += time.perf_counter() - t0
            K = len(self.levels)
            rows = [(smp, k, pid, b * K + k) for b, key in enumerate(good_keys)
                    for smp, k, pid in units[key]["rows"]]
            flat = pix.reshape(-1, *pix.shape[2:])
            records = []
            prompts = {}  # one chat rendering per sample, shared by its K levels
            for c in range(0, len(rows), gen_bs):
                chunk = rows[c:c + gen_bs]
                texts = []
                for smp, *_ in chunk:
                    key = (smp.index, smp.turn)
                    if key not in prompts:
                        prompts[key] = self.gen.prompt(smp.prompt)
                    texts.append(prompts[key])
                idx = torch.tensor([r[3] for r in chunk], device=self.device)
                t0 = time.perf_counter()
                answers, ntok = self.gen.generate_split(
                    texts, flat.index_select(0, idx),
                    row_seeds=[derive_seed(cfg.seed, r[2]) for r in chunk],
                    on_split=self._count_oom)
                records.extend(self._weakened_records(chunk, answers, ntok, t0, settings))
            if self._end_batch(records, len(rows)):
                break
        del it, loader

    def _weakened_records(self, chunk, answers, ntok, t0, settings):
        """Pair records of generated rows ``(sample, level index, pair id, ...)``; equal or empty
        answers are dropped (counted and logged). Counts the generation that began at ``t0`` and
        produced ``ntok`` tokens."""
        self.summary.timings["generate_s"] += time.perf_counter() - t0
        self.summary.generated_tokens += ntok
        out = []
        for (smp, k, pid, _), ans in zip(chunk, answers):
            reason = _rejection_reason(smp.chosen, ans)
            if reason:
                self._drop(reason, smp, pid)
                continue
            out.append(self._record(smp, pid, ans, "image_weakened", self.levels[k], None,
                                    settings))
        return out

    def _image_weakened_rows(self, units, bad_images):
        """image_weakened through the family's processor (:mod:`bpo_fast.data.vlm_generation`):
        each row's noise and sampling from its pair id's seed, as on the fixed-size path."""
        cfg = self.cfg
        settings = self.gen.settings()
        settings.update(noise_schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps)
        gen_bs = cfg.gen_batch_size or cfg.batch_size * len(self.levels)
        t = self.summary.timings
        for b0 in range(0, len(units), cfg.batch_size):
            rows, errs = [], []
            self.rows.clear()
            for u in units[b0:b0 + cfg.batch_size]:
                try:
                    image, _ = open_image(u["image"], cfg.image_root)
                    # the processor may reject an image (Qwen2-VL: aspect ratio over 200):
                    # a bad sample, found here rather than inside a batch of rows
                    self.rows.check(self.gen.prompt(u["rows"][0][0].prompt), image)
                except (ImageError, SampleError, OSError) as exc:
                    # a bad image never stops the run: logged, skipped, counted
                    bad_images.add(u["image"])
                    stage = "sample" if isinstance(exc, SampleError) else "image"
                    errs.append({"stage": stage, "line": u["line"], "source_id": u["source_id"],
                                 "image": u["image"], "reason": f"{type(exc).__name__}: {exc}"})
                    self._progress(len(u["rows"]))
                    continue
                rows.extend((smp, k, pid, image) for smp, k, pid in u["rows"])
            self._log_errors(errs)
            records = []
            for c in range(0, len(rows), gen_bs):
                chunk = rows[c:c + gen_bs]
                t0 = time.perf_counter()
                inputs = self.rows([(self.gen.prompt(smp.prompt), image, self.levels[k],
                                     derive_seed(cfg.seed, pid, "noise"))
                                    for smp, k, pid, image in chunk], self.device, self.dtype)
                t["noise_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                answers, ntok = self.gen.generate_inputs(
                    inputs, row_seeds=[derive_seed(cfg.seed, r[2]) for r in chunk])
                records.extend(self._weakened_records(chunk, answers, ntok, t0, settings))
            if self._end_batch(records, len(rows)):
                break

    # -- error injection ---------------------------------------------------------------------
    def _llm_generate(self, texts, keys):
        """The LLM injector's generation: row ``i`` sampled from the seed of pair ``keys[i]``."""
        t0 = time.perf_counter()
        out = []
        ntok = 0
        bs = self.cfg.gen_batch_size or self.cfg.batch_size
        seeds = [derive_seed(self.cfg.seed, k) for k in keys]
        for c in range(0, len(texts), bs):
            a, n = self.gen.generate_split(texts[c:c + bs], None, row_seeds=seeds[c:c + bs],
                                           max_new_tokens=self.cfg.inject_max_new_tokens,
                                           on_split=self._count_oom)
            out.extend(a)
            ntok += n
        self.summary.generated_tokens += ntok
        self.summary.timings["generate_s"] += time.perf_counter() - t0
        return out, ntok

    def _missing_images(self, samples, bad_images):
        """Without image_weakened no image is decoded; an image file that does not exist under
        the --image-root given (a wrong one) would still make pairs the trainer cannot use:
        named, counted and left out, like an image that does not decode. Without --image-root
        the image paths are names only (train resolves them under its own)."""
        errs, found = [], {}
        for smp in samples:
            if smp.image is None:
                continue
            refs = smp.image if isinstance(smp.image, (list, tuple)) else [smp.image]
            for ref in refs:
                path = ref if os.path.isabs(ref) else os.path.join(self.cfg.image_root, ref)
                if path not in found:
                    found[path] = os.path.isfile(path)
                if not found[path]:
                    bad_images.add(smp.image)
                    errs.append({"stage": "image", "line": smp.line, "source_id": smp.source_id,
                                 "image": smp.image, "reason": f"no such image file {path!r}"})
                    break
        self._log_errors(errs)

    def error_injection(self, samples, bad_images):
        cfg = self.cfg
        if "image_weakened" not in cfg.strategies and cfg.image_root is not None:
            self._missing_images([s for s in samples if s.pair_id("error_injection", cfg.injector)
                                  not in self.done], bad_images)
        todo = []
        for smp in samples:
            pid = smp.pair_id("error_injection", cfg.injector)
            if pid in self.done:
                self.summary.already_done += 1
                self._progress(1)
            elif smp.image is not None and smp.image in bad_images:
                self._progress(1)  # its image is unreadable: the trainer could not use the pair
            else:
                todo.append((smp, pid))
        if cfg.injector == "llm":
            settings = dict(self.gen.settings(), template_crc32=self.template_crc)
            if cfg.inject_max_new_tokens is not None:
                settings["max_new_tokens"] = cfg.inject_max_new_tokens
                settings["min_new_tokens"] = min(cfg.min_new_tokens, cfg.inject_max_new_tokens)
        else:
            settings = {"max_edits": cfg.max_edits}
        for c in range(0, len(todo), cfg.batch_size):
            chunk = todo[c:c + cfg.batch_size]
            t0 = time.perf_counter()
            rejected = self.injector.inject_batch([smp for smp, _ in chunk])
            self.summary.timings["inject_s"] += time.perf_counter() - t0
            records = []
            for (smp, pid), rej in zip(chunk, rejected):
                reason = _rejection_reason(smp.chosen, rej)
                if reason:
                    self._drop(reason, smp, pid)
                    continue
                records.append(self._record(smp, pid, rej, "error_injection", None, cfg.injector, settings))
            if self._end_batch(records, len(chunk)):
                break

    def _end_batch(self, records, n_rows):
        """After a batch: write its records, count its rows, apply the bad-sample policy, follow
        the free CPUs (when the caller chose threads that way: ``runtime.use_threads``). True:
        the run should stop."""
        self._write(records)
        self._progress(n_rows)
        self._check_bad()
        adapt_threads()
        return self._stop()

    def _record(self, smp, pid, rejected, strategy, level, injector, settings):
        return {"id": pid, "image": smp.image, "prompt": smp.prompt, "chosen": smp.chosen,
                "rejected": rejected, "strategy": strategy, "noise_step": level,
                "injector": injector, "generation": settings, "seed": self.cfg.seed,
                "source_id": smp.source_id, "turn": smp.turn}

    # -- main --------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        self.summary.setup_s = time.perf_counter() - self.t0  # model load etc., not in the rates
        self.t0 = time.perf_counter()
        try:
            samples = self.read_samples()
            total = 0
            if "image_weakened" in cfg.strategies:
                total += sum(1 for s in samples if s.image is not None) * len(self.levels)
            if "error_injection" in cfg.strategies:
                total += len(samples)
            if cfg.progress:
                from tqdm.auto import tqdm

                # our own rates only (written pairs/s, generated tokens/s): tqdm's would count
                # attempts, dropped and already-done pairs included
                self.pbar = tqdm(total=total, unit="pair", desc=f"build-pairs[{self.rank}/{self.world}]",
                                 dynamic_ncols=True,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
            bad_images = set()
            if "image_weakened" in cfg.strategies:
                self.image_weakened(samples, bad_images)
            if "error_injection" in cfg.strategies and not self.summary.stopped_early:
                self.error_injection(samples, bad_images)
            self._check_bad(final=True)
        finally:
            if self.pbar is not None:
                self._last_postfix = 0.0
                self._progress(0)  # final rates on the bar
                self.pbar.close()
            self.writer.close()
            self.err_file.close()
        self.summary.elapsed_s = time.perf_counter() - self.t0
        return self.summary


def _worker_init(_):
    torch.set_num_threads(1)  # decode workers use PIL; torch threads would only oversubscribe


def _validate_config(cfg):
    if not isinstance(cfg, PairBuilderConfig):
        raise TypeError(f"config: expected a PairBuilderConfig, got {type(cfg).__name__}")
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"{name}: required")
    strategies = cfg.strategies
    if isinstance(strategies, str):
        strategies = tuple(s.strip() for s in strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if not strategies or bad:
        raise ValueError(f"strategies: expected a non-empty subset of {list(STRATEGIES)}, got {list(strategies)}")
    cfg = dataclasses.replace(cfg, strategies=tuple(dict.fromkeys(strategies)),
                              noise_steps=parse_noise_steps(cfg.noise_steps))
    cfg = dataclasses.replace(cfg, num_workers=choose_num_workers(cfg.num_workers))
    check_sampling(cfg)
    if any(s is not None and s >= cfg.num_noise_steps for s in cfg.noise_steps):
        raise ValueError(f"noise_steps: every step must be < num_noise_steps ({cfg.num_noise_steps}), "
                         f"got {list(cfg.noise_steps)}")
    if "image_weakened" in cfg.strategies and any(s is not None for s in cfg.noise_steps):
        schedule_for(cfg.noise_schedule, cfg.num_noise_steps)  # unknown kind: fail before any work
    input_file(cfg.data, "data", what="LLaVA-format JSON/JSONL file", text=True)
    if cfg.image_root is not None:
        input_dir(cfg.image_root, "image_root")
    output_file(cfg.out, "out")
    if cfg.errors:
        output_file(cfg.errors, "errors")
    if cfg.summary_json:
        output_file(cfg.summary_json, "summary_json")
    if isinstance(cfg.lexicon, (str, os.PathLike)):
        input_file(cfg.lexicon, "lexicon", what="JSON lexicon file", text=True)
    if cfg.inject_template:
        input_file(cfg.inject_template, "inject_template", what="text template", text=True)
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite: pick one")
    if cfg.max_batches is not None and cfg.max_batches < 1:
        raise ValueError(f"max_batches: expected an int >= 1 or None, got {cfg.max_batches}")
    cfg = dataclasses.replace(cfg, processor_kwargs=check_processor_kwargs(cfg.processor_kwargs),
                              max_bad_fraction=check_max_bad_fraction(cfg.max_bad_fraction))
    return cfg


def _check_own_summary(path):
    """``--summary-json`` is a side file: an existing file there is replaced only when it is a
    summary a build wrote (a JSON object with :class:`BuildSummary`'s fields), never someone's
    file that happens to sit at that path."""
    if not os.path.exists(path):
        return
    import json

    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    fields = {f.name for f in dataclasses.fields(BuildSummary)}
    if not isinstance(rec, dict) or not fields <= set(rec):
        raise UserError(f"summary_json: {path!r} exists and was not written by bpo-fast "
                        "build-pairs (not a build summary); choose another path or move it away")


def build_pairs(config, model=None, processor=None):
    """Build preference pairs as configured; return a :class:`BuildSummary`.

    ``model``/``processor``: an already loaded LLaVA-style model and its processor (else they
    are loaded from ``config.model`` on ``config.device`` in ``config.dtype``).
    """
    cfg = _validate_config(config)
    if (model is None) != (processor is None):
        raise ValueError("model and processor: pass both or neither")
    needs_model = _needs_model(cfg)
    if needs_model and not cfg.model and model is None:
        raise ValueError("model: required for image_weakened and for injector='llm' (a model "
                         "directory, or pass model= and processor=)")
    if needs_model and model is None:
        input_dir(cfg.model, "model", what="model directory (a save_pretrained folder)")
    run = None
    with _guard(cfg, needs_model and model is None, config_file_of(config)) as guard:
        guard.status = lambda: _stopped_at(run)
        if cfg.summary_json:   # after the guard's own rules (an input, an image, ...)
            rank, world, _ = dist_env(cfg.rank, cfg.world_size)
            _check_own_summary(shard_path(cfg.summary_json, rank, world))
        run = _Run(cfg, model, processor, needs_model)
        summary = run.run()
        if cfg.summary_json:
            from bpo_fast.data.jsonl import atomic_write_json

            atomic_write_json(shard_path(cfg.summary_json, run.rank, run.world),
                              summary.to_dict())
        return summary


def _guard(cfg, reads_model, config_file):
    """The command guard of a build (:class:`bpo_fast.errors.CommandGuard`): this rank's pair
    file, errors file and summary against every file it reads; each locked."""
    from bpo_fast.errors import DIR, FILE, ROOT, CommandGuard

    rank, world, _ = dist_env(cfg.rank, cfg.world_size)
    inputs = [("data", cfg.data, FILE), ("image_root", cfg.image_root, ROOT),
              ("model", cfg.model if reads_model else None, DIR),
              ("lexicon", cfg.lexicon if isinstance(cfg.lexicon, (str, os.PathLike)) else None,
               FILE),
              ("inject_template", cfg.inject_template, FILE), ("--config", config_file, FILE)]
    if cfg.chat_template and os.path.isfile(cfg.chat_template):
        inputs.append(("chat_template", cfg.chat_template, FILE))
    outputs = [("out", shard_path(cfg.out, rank, world), FILE),
               ("errors", shard_path(cfg.errors or errors_path(cfg.out), rank, world), FILE),
               ("summary_json", cfg.summary_json and shard_path(cfg.summary_json, rank, world),
                FILE)]
    return CommandGuard("build-pairs", inputs=inputs, outputs=outputs)


def _stopped_at(run):
    """Where an interrupted or failed build stopped, what it kept, how to resume."""
    from bpo_fast.errors import appended_status

    started = run is not None and hasattr(run, "writer")
    return appended_status(run.out if started else None,
                           run.summary.total_written if started else 0, "pair")


def _needs_model(cfg):
    """Whether a strategy generates with the model (image-weakened answers, the LLM injector)."""
    return "image_weakened" in cfg.strategies or (
        "error_injection" in cfg.strategies and cfg.injector == "llm")

