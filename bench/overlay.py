"""The wheels a GPU session carries (``.whl/``) and which of them a machine gets.

The GPU machine has no network; ``bench/fetch_wheels.sh`` downloads, where pip works, the wheels
of ``bench/wheels.txt`` into ``.whl/`` and ``bench/gpu_session.sh`` installs them on the machine
into an overlay folder put first on ``PYTHONPATH``. One rule decides what goes in, here:

- a wheel is **not** installed when the machine already has that distribution at the same or a
  newer version: its own copy stays in use (an overlay copy of, say, pyarrow would shadow the one
  its pandas was built with);
- of several carried versions of one distribution (``datasets`` for a new and for an old
  pyarrow) the newest whose requirements the machine + overlay meet is installed;
- a wheel whose requirements are not met (a missing distribution, a version out of range) is
  left out, and so is every wheel that needs it (``trl`` without ``datasets``); each is said,
  with the reason.

``python bench/overlay.py check .whl --device bench/device-env.txt [--python 3.12]`` applies the
rule to the machine's documented software (``fetch_wheels.sh`` runs it): it fails when ``.whl``
holds something the machine has as new, when a wheel's requirement is neither on the machine
nor carried, or when ``.whl`` weighs more than ``--max-mib`` (a call carries at most 64 MiB).
``python bench/overlay.py install .whl --target DIR`` applies it to the running interpreter's
installed distributions and installs the chosen wheels with ``pip --no-index --no-deps
--target`` (run it with the overlay *not* on ``sys.path``).
Requirements are read from each wheel's METADATA, markers evaluated for the target Python (extras
are ignored: nothing here asks for one).
"""

import argparse
import email.parser
import os
import subprocess
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

UNKNOWN = "?"  # on the machine, version not documented


class Wheel:
    def __init__(self, path):
        self.path = path
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist()
                        if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
        self.name = canonicalize_name(msg["Name"])
        self.version = Version(msg["Version"])
        self.requires = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
        self.size = os.path.getsize(path)

    def __repr__(self):
        return f"{self.name} {self.version}"


def _parse_version(v):
    try:
        return Version(v)
    except InvalidVersion:
        return None


def installed_versions():
    """``{name: Version}`` of the running interpreter's distributions (first on sys.path wins)."""
    from importlib.metadata import distributions

    out = {}
    for d in distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), _parse_version(d.version) or UNKNOWN)
    return out


def documented_versions(path):
    """``{name: Version or UNKNOWN}`` from a device file: ``name==version`` or a bare ``name``
    (present, version not documented); ``#`` starts a comment."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = line.partition("==")
            out[canonicalize_name(name.strip())] = (_parse_version(version.strip().split("+")[0])
                                                    if version else UNKNOWN)
    return out


def _needs(wheel, env):
    """Requirements of ``wheel`` that apply under the marker environment ``env``."""
    out = []
    for r in wheel.requires:
        if r.marker is not None and not r.marker.evaluate(dict(env, extra="")):
            continue
        out.append(r)
    return out


def plan(wheels, machine, python=None):
    """``(chosen, decisions)``: the wheels to install and, for every wheel, ``(wheel, action,
    reason)`` with action ``install`` / ``skip``. ``machine``: ``{name: Version or UNKNOWN}``;
    ``python``: "3.12" to evaluate markers for another Python than the running one."""
    env = default_environment()
    if python:
        env.update(python_version=python, python_full_version=python + ".0")
    decisions = {}
    candidates = {}
    for w in sorted(wheels, key=lambda w: w.version, reverse=True):
        have = machine.get(w.name)
        if have is not None and have != UNKNOWN and have >= w.version:
            decisions[w.path] = (w, "skip", f"the machine has {have}")
        elif have == UNKNOWN:
            decisions[w.path] = (w, "skip", "the machine has it (version not documented)")
        else:
            candidates.setdefault(w.name, []).append(w)
    while True:
        chosen = {name: ws[0] for name, ws in candidates.items() if ws}
        dropped = False
        for name, w in chosen.items():
            for r in _needs(w, env):
                dep = canonicalize_name(r.name)
                got = chosen[dep].version if dep in chosen else machine.get(dep)
                if got is None:
                    why = f"needs {r}: neither on the machine nor carried"
                elif got == UNKNOWN or r.specifier.contains(got, prereleases=True):
                    continue
                else:
                    where = "carried" if dep in chosen else "the machine has"
                    why = f"needs {r}, {where} {got}"
                decisions[w.path] = (w, "skip", why)
                candidates[name].remove(w)
                dropped = True
                break
            if dropped:
                break
        if not dropped:
            break
    for name, ws in candidates.items():
        for w in ws[1:]:
            decisions[w.path] = (w, "skip", f"an alternative: {chosen[name].version} is chosen")
    for w in chosen.values():
        have = machine.get(w.name)
        unverified = sorted({str(r) for r in _needs(w, env)
                             if canonicalize_name(r.name) not in chosen
                             and machine.get(canonicalize_name(r.name)) == UNKNOWN
                             and r.specifier})
        reason = f"the machine has {have}" if have is not None else "the machine lacks it"
        if unverified:
            reason += f"; unverified (undocumented versions): {', '.join(unverified)}"
        decisions[w.path] = (w, "install", reason)
    order = sorted(decisions.values(), key=lambda d: (d[1] != "install", d[0].name))
    return sorted(chosen.values(), key=lambda w: w.name), order


def print_plan(decisions, out=sys.stdout):
    for w, action, reason in decisions:
        print(f"  {action:7s} {w.name:22s} {str(w.version):12s} {w.size / 2**20:6.2f} MiB  {reason}",
              file=out)


def load_wheels(folder):
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".whl"))
    return [Wheel(p) for p in paths]


def cmd_check(a):
    wheels = load_wheels(a.wheels)
    total = sum(w.size for w in wheels)
    device = documented_versions(a.device)
    chosen, decisions = plan(wheels, device, a.python)
    print(f"{a.wheels}: {len(wheels)} wheels, {total / 2**20:.1f} MiB (limit {a.max_mib} MiB); "
          f"against {a.device} (python {a.python}):")
    print_plan(decisions)
    problems = []
    if total > a.max_mib * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over {a.max_mib} MiB")
    chosen_names = {w.name for w in chosen}
    for w, action, reason in decisions:
        if action == "install":
            continue
        if reason.startswith("the machine has"):
            problems.append(f"{w} is carried but {reason}: drop it from bench/wheels.txt")
        elif w.name not in chosen_names:
            problems.append(f"{w} would not be installed ({reason})")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_install(a):
    wheels = load_wheels(a.wheels)
    chosen, decisions = plan(wheels, installed_versions())
    print(f"overlay {a.target}: {len(chosen)} of {len(wheels)} wheels from {a.wheels}")
    print_plan(decisions)
    missing = [n for n in a.require if canonicalize_name(n) not in {w.name for w in chosen}
               and canonicalize_name(n) not in installed_versions()]
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--disable-pip-version-check",
                        "--upgrade", "--target", a.target] + [w.path for w in chosen], check=True)
    if missing:
        print(f"error: required but not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="the rule against the machine's documented software")
    c.add_argument("wheels")
    c.add_argument("--device", required=True, help="the machine's documented software")
    c.add_argument("--python", default="3.12", help="the machine's Python (markers)")
    c.add_argument("--max-mib", type=float, default=60.0)
    i = sub.add_parser("install", help="the rule against this interpreter, then install")
    i.add_argument("wheels")
    i.add_argument("--target", required=True)
    i.add_argument("--require", nargs="*", default=[],
                   help="distributions that must end up installed (else exit 1)")
    a = ap.parse_args(argv)
    return cmd_check(a) if a.cmd == "check" else cmd_install(a)


if __name__ == "__main__":
    sys.exit(main())
