"""Every option of every command, declared once.

A command's options are the fields of one dataclass; each field carries its help text (and
optionally its CLI name, choices, parser, group) in ``metadata`` through :func:`option`. From
that one declaration come:

- the ``argparse`` arguments and ``--help`` (with the default of every option),
- ``--config run.json|yaml``: a file of the same options (field names or CLI names; an unknown
  key is an error naming it); options given on the command line win over the file,
- the option tables of the README (:func:`markdown_table`; ``python -m bpo_fast.options
  README.md`` rewrites them, and a test checks they are current).

Fields without ``help`` are Python-API-only (not on the command line).
"""

import argparse
import dataclasses
import json
import os
import sys

from bpo_fast.errors import UserError, int_at_least

__all__ = ["option", "cli_fields", "add_arguments", "from_args", "load_config_file",
           "markdown_table", "COMMAND_OPTIONS", "canonical_dtype", "parse_device"]

_UNSET = object()  # argparse default: "not given on the command line"


def option(default=dataclasses.MISSING, *, help, cli=None, choices=None, type=None,
           metavar=None, group=None, positional=False, nargs=None, const=None, aliases=(),
           negate=False, required=False, default_text=None):
    """A dataclass field that is also a command-line option.

    ``cli``: the flag without dashes (default: the field name with ``-`` for ``_``); a bool
    field defaulting to True gets a ``--no-...``-style flag through ``cli`` (e.g.
    ``cli="no-progress"``). ``choices``: a tuple or a callable returning one (read lazily, e.g.
    from a registry). ``type``: the parser of one value (default: from the field's default).
    ``negate``: a bool defaulting to True whose flag turns it off (``--greedy`` for do_sample).
    ``required``: the command line (or ``--config``) must give it, though the Python API has a
    default (``None``, checked later). ``default_text``: how ``--help`` shows the default when
    it is computed (e.g. "2 * r").
    """
    meta = {"help": help, "cli": cli, "choices": choices, "type": type, "metavar": metavar,
            "group": group, "positional": positional, "nargs": nargs, "const": const,
            "aliases": tuple(aliases), "negate": negate, "required": required,
            "default_text": default_text}
    return dataclasses.field(default=default, metadata=meta)


def threads_option(**kw):
    """The ``--threads`` option of the CPU-heavy commands (``bpo_fast.runtime.use_threads``)."""
    return option(None, help="torch CPU threads", type=int_at_least(1), metavar="N",
                  default_text="the CPUs of the affinity mask that other processes leave free, "
                               "measured from /proc/stat and followed while the command runs",
                  **kw)


def device_option(**kw):
    """The ``--device`` option of the commands that run under torchrun."""
    return option(None, help="cpu, cuda or cuda:N", type=parse_device, metavar="DEVICE",
                  default_text="cuda if available (cuda:LOCAL_RANK under torchrun)", **kw)


def dtype_option(help="model dtype (auto: bf16 on CUDA, fp32 on CPU)", **kw):
    """A ``--dtype`` option (``auto``, ``fp32``, ``bf16``, ``fp16``; aliases accepted)."""
    return option("auto", help=help, type=canonical_dtype, choices=DTYPE_CHOICES, **kw)


MAX_BAD_FRACTION = 0.1


def fraction(s):
    """An argparse ``type``: a number in [0, 1]."""
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:   # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {s!r}")
    return v


fraction.__name__ = "fraction"


def json_object(s):
    """An argparse ``type``: a JSON object (``'{"do_pan_and_scan": true}'``) -> dict; a dict
    (from ``--config``) is checked and kept."""
    if isinstance(s, dict):
        v = s
    else:
        try:
            v = json.loads(s)
        except (TypeError, json.JSONDecodeError) as exc:
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} "
                                             f"({getattr(exc, 'msg', exc)})") from None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise argparse.ArgumentTypeError(f"expected a JSON object of named arguments, got {s!r}")
    return v


json_object.__name__ = "JSON object"


def max_bad_fraction_option(**kw):
    """``--max-bad-fraction`` of every command that reads samples (the bad-sample policy:
    :mod:`bpo_fast.data.bad_samples`)."""
    return option(MAX_BAD_FRACTION, help="bad samples (a malformed record, an image that does "
                                         "not decode, a prompt whose <image> tags disagree with "
                                         "its images, a sample the processor rejects) are named "
                                         "in the errors file, skipped and counted; more than "
                                         "this share of a data file stops the run (exit 2)",
                  type=fraction, metavar="X", **kw)


def processor_kwargs_option(**kw):
    """``--processor-kwargs``: extra arguments of every processor call of a command."""
    return option(None, help="extra arguments of every processor call, a JSON object (e.g. "
                             "'{\"do_pan_and_scan\": true}' for Gemma 3); also a mapping in "
                             "--config", type=json_object, metavar="JSON", default_text="none",
                  **kw)


def check_processor_kwargs(v, name="processor_kwargs"):
    """``v`` (None or a dict of named arguments) as a dict; ``ValueError`` naming ``name``."""
    if v is None:
        return {}
    try:
        return dict(json_object(v))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{name}: {exc}") from None


def cli_fields(cls):
    """The fields of ``cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("help")]


def _flag(f):
    return "--" + (f.metadata.get("cli") or f.name.replace("_", "-"))


def _choices(f):
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


def _required(f):
    return f.default is dataclasses.MISSING or bool(f.metadata.get("required"))


def _is_negated(f):
    return f.default is True and (f.metadata.get("negate")
                                  or (f.metadata.get("cli") or "").startswith("no-"))


def _default_text(f):
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    if f.default is dataclasses.MISSING:
        return None
    d = f.default
    if isinstance(d, bool):
        return None
    if isinstance(d, (tuple, list)):
        return ",".join("none" if x is None else str(x) for x in d)
    return None if d is None else str(d)


def _value_type(f):
    if f.metadata.get("type") is not None:
        return f.metadata["type"]
    d = f.default
    if isinstance(d, bool) or d is dataclasses.MISSING or d is None:
        ann = f.type if isinstance(f.type, type) else {"int": int, "float": float,
                                                       "str": str}.get(str(f.type))
        return ann if ann in (int, float) else None
    if isinstance(d, (int, float)):
        return type(d)
    return None


def add_arguments(parser, cls, *, config=True):
    """Add one argument per option of ``cls`` (grouped by ``group``), and ``--config``."""
    groups = {}
    for f in cli_fields(cls):
        m = f.metadata
        g = m.get("group")
        target = parser if g is None else groups.setdefault(g, parser.add_argument_group(g))
        help_ = m["help"]
        dt = _default_text(f)
        if _required(f) and not m.get("positional"):
            help_ += " (required)"
        elif dt is not None:
            help_ += f" (default: {dt})"
        help_ = help_.replace("%", "%%")
        if m.get("positional"):
            target.add_argument(f.name, nargs=m.get("nargs") or None, metavar=m.get("metavar"),
                                help=help_, default=_UNSET)
            continue
        names = [_flag(f)] + ["--" + a for a in m.get("aliases", ())]
        kw = dict(dest=f.name, help=help_, default=_UNSET)
        is_bool = isinstance(f.default, bool) or f.type in (bool, "bool")
        if is_bool and m.get("type") is None:
            kw["action"] = "store_const"
            kw["const"] = not _is_negated(f)
        else:
            t = _value_type(f)
            if t is not None:
                kw["type"] = t
            if _choices(f) is not None:
                kw["choices"] = _choices(f)
            if m.get("metavar"):
                kw["metavar"] = m["metavar"]
            elif _choices(f) is None:
                kw["metavar"] = {int: "N", float: "X"}.get(t, "STR")
            if m.get("nargs"):
                kw["nargs"] = m["nargs"]
                if m["nargs"] == "?":
                    kw["const"] = m.get("const")
        target.add_argument(*names, **kw)
    if config:
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="read options from a JSON or YAML file (keys: the long option "
                                 "names, with - or _); options on the command line win")


def load_config_file(path, cls):
    """A ``--config`` file -> ``{field name: value}``; unknown keys raise :class:`UserError`."""
    from bpo_fast.errors import input_file

    input_file(path, "--config", what="JSON or YAML config file", text=True)
    with open(path, encoding="utf-8-sig") as f:   # a byte-order mark is dropped
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UserError(f"--config: {path!r} is YAML, which needs PyYAML (pip install pyyaml); "
                            "or write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--config: {path!r} is not valid YAML "
                            f"({' '.join(str(exc).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--config: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path!r}: expected a mapping of option names to values, got "
                        f"{type(data).__name__}")
    fields = {f.name: f for f in cli_fields(cls)}
    by_flag = {_flag(f)[2:]: f.name for f in fields.values()}
    out, unknown = {}, []
    for k, v in data.items():
        name = k if k in fields else by_flag.get(str(k).lstrip("-"), str(k).replace("-", "_"))
        if name not in fields:
            unknown.append(k)
            continue
        f = fields[name]
        t = _value_type(f)
        if t is not None and isinstance(v, str) and t not in (int, float):
            v = t(v)                              # e.g. "200,500" for noise_steps
        elif t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if _choices(f) is not None and v not in _choices(f):
            raise UserError(f"--config: {path!r}: {k}: expected one of {list(_choices(f))}, "
                            f"got {v!r}")
        out[name] = v
    if unknown:
        raise UserError(f"--config: {path!r}: unknown option(s) {unknown}; expected some of "
                        f"{sorted(fields)}")
    return out


def from_args(cls, args, **extra):
    """The dataclass ``cls`` from parsed ``args``: ``--config`` file values, overridden by the
    options given on the command line, then ``extra``; missing required options raise
    :class:`UserError` naming their flags."""
    values = {}
    cfg = getattr(args, "config", None)
    if cfg:
        values.update(load_config_file(cfg, cls))
    for f in cli_fields(cls):
        v = getattr(args, f.name, _UNSET)
        if v is not _UNSET:
            values[f.name] = v
    values.update(extra)
    missing = [_flag(f) if not f.metadata.get("positional")
               else (f.metadata.get("metavar") or f.name).upper()
               for f in cli_fields(cls) if f.name not in values and _required(f)]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)} (on the "
                        "command line or in --config)")
    return cls(**values)


def _md(text):
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown_table(cls):
    """The README table of a command's options."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in cli_fields(cls):
        m = f.metadata
        if m.get("positional"):
            name = f"`{(m.get('metavar') or f.name).upper()}`"
        else:
            flags = [_flag(f)] + ["--" + x for x in m.get("aliases", ())]
            name = ", ".join(f"`{n}`" for n in flags)
        if _choices(f) is not None:
            name += " {" + ", ".join(str(c) for c in _choices(f)) + "}"
        dt = _default_text(f)
        if _required(f):
            dt = "required"
        elif isinstance(f.default, bool):
            dt = "off"             # a flag: not given unless asked for
        help_ = _md(m["help"])
        if dt not in (None, "required", "off"):
            dt = f"`{dt}`"
        rows.append(f"| {name} | {dt if dt is not None else ''} | {help_} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# one vocabulary across commands
# --------------------------------------------------------------------------------------------

_DTYPE_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32",
                  "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                  "half": "fp16"}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def canonical_dtype(name):
    """``float32``/``fp32`` -> ``fp32`` (and bf16, fp16, auto); argparse type of every
    ``--dtype``."""
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(
            f"expected auto, fp32, bf16 or fp16 (or float32, bfloat16, float16), got {name!r}")
    return _DTYPE_ALIASES[key]


def parse_device(s):
    """``cpu``, ``cuda`` or ``cuda:N``: argparse type of every ``--device``."""
    import re

    if s is None or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", str(s)):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")


# --------------------------------------------------------------------------------------------
# the README tables
# --------------------------------------------------------------------------------------------

def _command_options():
    """command -> the dataclass of its options (imports the command modules' option classes)."""
    from bpo_fast.data.cli_merge import MergeOptions
    from bpo_fast.data.pairs import PairBuilderConfig
    from bpo_fast.demo.cli import DemoOptions
    from bpo_fast.eval.cli import ChairOptions
    from bpo_fast.eval.cli_pope import PopeOptions
    from bpo_fast.eval.generate import GenerateOptions
    from bpo_fast.train.cli_ref import RefLogpsOptions
    from bpo_fast.train.config import TrainConfig

    return {"build-pairs": PairBuilderConfig, "merge-pairs": MergeOptions,
            "ref-logps": RefLogpsOptions, "train": TrainConfig, "generate": GenerateOptions,
            "eval-chair": ChairOptions,
            "eval-pope": PopeOptions, "demo": DemoOptions}


COMMAND_OPTIONS = _command_options  # a function: importing the classes imports torch


def render_readme(text):
    """``text`` with every ``<!-- options:CMD -->...<!-- /options:CMD -->`` block regenerated."""
    import re

    table = {k: markdown_table(v) for k, v in _command_options().items()}

    def sub(m):
        cmd = m.group(1)
        if cmd not in table:
            raise ValueError(f"README: no command {cmd!r} (known: {sorted(table)})")
        return f"<!-- options:{cmd} -->\n{table[cmd]}\n<!-- /options:{cmd} -->"

    return re.sub(r"<!-- options:([\w-]+) -->.*?<!-- /options:\1 -->", sub, text, flags=re.S)


if __name__ == "__main__":  # python -m bpo_fast.options README.md: rewrite the option tables
    path = sys.argv[1] if len(sys.argv) > 1 else "README.md"
    with open(path, encoding="utf-8") as fh:
        old = fh.read()
    new = render_readme(old)
    if new != old:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.replace(tmp, path)
    print(f"{path}: option tables {'updated' if new != old else 'already current'}")
