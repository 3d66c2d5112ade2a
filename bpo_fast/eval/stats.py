"""Seed statistics: means with bootstrap 95% confidence intervals, and paired per-seed
differences (e.g. BPO minus the supervised control) with theirs.

The interval is the percentile bootstrap: ``n_boot`` resamples of the seeds with replacement
(numpy, seeded, so a report is reproducible), the 2.5th and 97.5th percentiles of the
resampled means. With one seed the interval is that value itself (``n`` says how little it
is); with few seeds the percentile interval is narrow, as it is in every bootstrap -- read
``n`` with it. ``None`` values (an undefined score, e.g. CHAIR-i of a model that mentions no
object) are left out, and a paired difference needs both values of its seed.

API: :func:`mean_ci(values) -> dict` (``mean``, ``lo``, ``hi``, ``n``, ``values``),
:func:`paired_differences(a, b) -> dict` (``a - b`` per seed, their :func:`mean_ci`, and in
how many seeds ``a`` is below/above ``b``), :func:`ci_excludes_zero`.
"""

import math

import numpy as np

__all__ = ["mean_ci", "paired_differences", "ci_excludes_zero"]


def _clean(values, what):
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what}: expected a list (or a dict seed -> value) of numbers, got "
                        f"{type(values).__name__}")
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(v):
            raise ValueError(f"{what}: expected finite numbers or None, got {v!r}")
        out.append(float(v))
    return out


def mean_ci(values, *, level=0.95, n_boot=10000, seed=0):
    """Mean of ``values`` (a list, or a dict seed -> value; ``None`` left out) with a percentile
    bootstrap confidence interval at ``level``. Returns ``{"mean", "lo", "hi", "n", "values"}``
    (all ``None`` but ``n`` = 0 when there is no value)."""
    if not (isinstance(level, float) and 0 < level < 1):
        raise ValueError(f"level: expected a float in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot: expected an int >= 1, got {n_boot!r}")
    xs = _clean(values, "values")
    if not xs:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    arr = np.asarray(xs, dtype=np.float64)
    m = float(arr.mean())
    if len(arr) == 1 or np.all(arr == arr[0]):
        return {"mean": m, "lo": m, "hi": m, "n": len(arr), "values": xs}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    means = arr[idx].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return {"mean": m, "lo": float(min(lo, m)), "hi": float(max(hi, m)), "n": len(arr),
            "values": xs}


def paired_differences(a, b, *, level=0.95, n_boot=10000, seed=0, shown=None):
    """``a - b`` per seed (``a``, ``b``: dicts seed -> value; seeds where either is ``None``
    are left out) with :func:`mean_ci` of the differences. Returns ``{"diffs": {seed: d},
    "mean", "lo", "hi", "n", "n_below", "n_above", "n_equal"}`` (``n_below``: seeds where
    ``a < b``). ``shown``: the values as a table prints them (e.g. rounded to its precision);
    the counts then compare those, so a difference the table shows as a tie counts as one."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise TypeError("a, b: expected dicts seed -> value (paired by seed)")
    if set(a) != set(b):
        raise ValueError(f"a, b: expected the same seeds, got {sorted(map(str, a))} and "
                         f"{sorted(map(str, b))}")
    _clean(a, "a")
    _clean(b, "b")
    diffs = {s: float(a[s]) - float(b[s]) for s in a if a[s] is not None and b[s] is not None}
    ci = mean_ci(list(diffs.values()), level=level, n_boot=n_boot, seed=seed)
    d = (list(diffs.values()) if shown is None else
         [shown(float(a[s])) - shown(float(b[s])) for s in diffs])
    return {"diffs": diffs, "mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "n": ci["n"],
            "n_below": sum(x < 0 for x in d), "n_above": sum(x > 0 for x in d),
            "n_equal": sum(x == 0 for x in d)}


def ci_excludes_zero(ci):
    """True when the interval of ``ci`` (from :func:`mean_ci`/:func:`paired_differences`) lies
    strictly on one side of 0 and rests on at least two values."""
    return ci.get("n", 0) >= 2 and ci["lo"] is not None and (ci["lo"] > 0 or ci["hi"] < 0)
