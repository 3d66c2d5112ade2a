"""Every option of every command, declared once.

A command's options are the fields of one dataclass; each field carries its help text (and
optionally its CLI name, choices, parser, group) in ``metadata`` through :func:`option`. From
that one declaration come:

- the ``argparse`` arguments and ``--help`` (with the default of every option),
- ``--config run.json|yaml``: a file of the same options (field names or CLI names; an unknown
  key is an error naming it); options given on the command line win over the file,
- the option tables of the README (:func:`markdown_table`; ``python -m
  bpo_fast.tools.readme_tables README.md`` rewrites them, and a test checks they are current).

Fields without ``help`` are Python-API-only (not on the command line).

A value is parsed and checked in one place, :func:`parse_value`, by its declaration: the
field's type (``int``, ``float``, ``bool``, ``str``; or the option's own ``type`` parser),
finite (no ``nan``/``inf``), within its ``bounds`` (``"[0, 1)"``), one of its ``choices``.
The command line (argparse ``type``), ``--config`` files (YAML's ``1e-4`` is a string to PyYAML;
``true``/``on``/``yes`` are booleans) and the Python API (:func:`check_values`, called by the
config classes' ``__post_init__`` and by :func:`from_args`) all go through it, before any model
loads.
"""

import argparse
import dataclasses
import json
import math
import re

from bpo_fast.errors import UserError

__all__ = ["option", "cli_fields", "add_arguments", "from_args", "load_config_file",
           "markdown_table", "canonical_dtype", "parse_device", "parse_value", "check_values",
           "config_file_of"]

_UNSET = object()  # argparse default: "not given on the command line"


def option(default=dataclasses.MISSING, *, help, cli=None, choices=None, type=None,
           metavar=None, group=None, positional=False, nargs=None, const=None, aliases=(),
           negate=False, required=False, default_text=None, bounds=None, nullable=False):
    """A dataclass field that is also a command-line option.

    ``cli``: the flag without dashes (default: the field name with ``-`` for ``_``); a bool
    field defaulting to True gets a ``--no-...``-style flag through ``cli`` (e.g.
    ``cli="no-progress"``). ``choices``: a tuple or a callable returning one (read lazily, e.g.
    from a registry). ``type``: the parser of one value (default: from the field's default).
    ``negate``: a bool defaulting to True whose flag turns it off (``--greedy`` for do_sample).
    ``required``: the command line (or ``--config``) must give it, though the Python API has a
    default (``None``, checked later). ``default_text``: how ``--help`` shows the default when
    it is computed (e.g. "2 * r"). ``bounds``: the range of a number, in interval notation
    (``"[0, 1)"``, ``"(0, inf)"``). ``nullable``: None is a valid value although the default is
    not None (e.g. ``max_length=None``: no limit, Python API).
    """
    if bounds is not None:
        _parse_bounds(bounds)  # a malformed declaration fails at import
    meta = {"help": help, "cli": cli, "choices": choices, "type": type, "metavar": metavar,
            "group": group, "positional": positional, "nargs": nargs, "const": const,
            "aliases": tuple(aliases), "negate": negate, "required": required,
            "default_text": default_text, "bounds": bounds, "nullable": nullable}
    return dataclasses.field(default=default, metadata=meta)


def threads_option(**kw):
    """The ``--threads`` option of the CPU-heavy commands (``bpo_fast.runtime.use_threads``;
    more than the machine's CPUs is clamped there, with a note)."""
    return option(None, help="torch CPU threads", type=int, bounds="[1, inf)", metavar="N",
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
                  type=float, bounds="[0, 1]", metavar="X", **kw)


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



# --------------------------------------------------------------------------------------------
# values: parsed and checked by their declaration
# --------------------------------------------------------------------------------------------

def _parse_bounds(spec):
    """``"[0, 1)"`` -> ``(0.0, True, 1.0, False)`` (low, low included, high, high included)."""
    m = re.fullmatch(r"\s*([\[(])\s*([-+\w.]+)\s*,\s*([-+\w.]+)\s*([\])])\s*", spec)
    if not m:
        raise ValueError(f"bounds: expected interval notation like '[0, 1)', got {spec!r}")
    return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"


def _describe_bounds(spec):
    lo, lo_in, hi, hi_in = _parse_bounds(spec)
    if math.isinf(hi):
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {spec.replace(' ', '').replace(',', ', ')}"


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _kind(f):
    """How a field's value is parsed: "custom" (the option's own ``type``), "bool", "int",
    "float", "str", or None (lists and other values: passed through)."""
    if f.metadata.get("type") is not None and f.metadata["type"] not in (int, float, str):
        return "custom"
    t = f.metadata.get("type") or f.type
    if t is bool or isinstance(f.default, bool):
        return "bool"
    return {int: "int", float: "float", str: "str"}.get(t)


def parse_value(f, v, *, choices=True):
    """``v`` (a string from the command line or a config file, or a Python value) as the
    option field ``f`` declares it; raises ``ValueError`` ("expected ..., got ...").
    ``choices=False``: not checked here (argparse checks them itself, with its own words)."""
    m = f.metadata
    if v is None:
        if f.default is None or m.get("nullable") or f.default is dataclasses.MISSING:
            return None
        raise ValueError(f"expected a value, got None (the default is {f.default!r})")
    if isinstance(v, (list, tuple)) and (f.type in (list, tuple) or m.get("nargs")):
        return v                                  # nargs options, lists from a config file
    kind = _kind(f)
    if kind == "custom":
        if isinstance(v, (str, dict)):            # dict: a mapping in a config file
            try:
                v = m["type"](v)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise ValueError(str(exc)) from None
    elif kind == "bool":
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            v = v.strip().lower() in _TRUE
        elif not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {v!r}")
    elif kind == "int":
        v = _to_int(v)
    elif kind == "float":
        v = _to_float(v)
    elif kind == "str" and not isinstance(v, str):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        else:
            raise ValueError(f"expected text, got {v!r}")
    allowed = _choices(f) if choices else None
    if allowed is not None and isinstance(v, (str, int, float)) and v not in allowed:
        raise ValueError(f"expected one of {list(allowed)}, got {v!r}")
    bounds = m.get("bounds")
    if bounds is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        lo, lo_in, hi, hi_in = _parse_bounds(bounds)
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            noun = "an integer" if kind == "int" else "a number"
            raise ValueError(f"expected {noun} {_describe_bounds(bounds)}, got {v!r}")
    return v


def _to_int(v):
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {v!r}") from None
    if not x.is_integer():
        raise ValueError(f"expected an integer, got {v!r}")
    return int(x)


def _to_float(v):
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {v!r}")
    return x


def _argparse_type(f):
    """The argparse ``type`` of an option: :func:`parse_value` (argparse names the flag)."""
    def parse(s):
        try:
            return parse_value(f, s, choices=False)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = f.name
    return parse


def check_values(obj):
    """Parse and check every option value of the dataclass instance ``obj`` in place (the
    Python API's path through :func:`parse_value`); raises :class:`UserError` naming the
    field."""
    for f in cli_fields(type(obj)):
        try:
            setattr(obj, f.name, parse_value(f, getattr(obj, f.name)))
        except ValueError as exc:
            raise UserError(f"{f.name}: {exc}") from None


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
            if t is not None or _kind(f) is not None:
                kw["type"] = _argparse_type(f)
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
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")   # a byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise UserError(f"--config: {path!r} is not UTF-8 text (byte {exc.start}: "
                        f"{raw[exc.start:exc.start + 1]!r})") from None
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
    by_flag.update({a: f.name for f in fields.values() for a in f.metadata.get("aliases", ())})
    out, unknown = {}, []
    for k, v in data.items():
        name = k if k in fields else by_flag.get(str(k).lstrip("-"), str(k).replace("-", "_"))
        if name not in fields:
            unknown.append(k)
            continue
        f = fields[name]
        try:
            v = parse_value(f, v)
        except ValueError as exc:
            raise UserError(f"--config: {path!r}: {k}: {exc}") from None
        if k not in fields and _is_negated(f) and isinstance(v, bool):
            v = not v                             # "greedy: true" is do_sample False
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
    obj = cls(**values)
    check_values(obj)
    obj._config_file = cfg  # an input of the command (bpo_fast.errors.CommandGuard)
    return obj


def config_file_of(obj):
    """The ``--config`` file ``obj`` was read from (an input of its command), or None."""
    return getattr(obj, "_config_file", None)


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
    """``cpu``, ``cuda`` or ``cuda:N`` (``mps``, ``xpu``, ``xpu:N`` where this torch has
    them): argparse type of every ``--device``; a device this torch cannot use here is an
    error."""
    if s is None:
        return s
    m = re.fullmatch(r"(cpu|cuda|mps|xpu)(?::(\d+))?", str(s))
    if not m or (m.group(1) in ("cpu", "mps") and m.group(2) is not None):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return s
    import torch

    if kind == "cuda":
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        why = "this torch is built without CUDA" if torch.version.cuda is None \
            else "no CUDA GPU is visible"
    elif kind == "mps":
        available = bool(getattr(torch.backends, "mps", None)) and \
            torch.backends.mps.is_available()
        count, why = 1, "MPS is not available here"
    else:
        xpu = getattr(torch, "xpu", None)
        available = xpu is not None and xpu.is_available()
        count = xpu.device_count() if available else 0
        why = "no XPU is available here"
    if not available:
        raise argparse.ArgumentTypeError(f"{s!r} cannot be used: {why} (use cpu)")
    if index is not None and int(index) >= count:
        raise argparse.ArgumentTypeError(f"{s!r}: there are {count} {kind} device(s), "
                                         f"{kind}:0 to {kind}:{count - 1}")
    return s

