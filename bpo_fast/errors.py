"""The one error rule of every ``bpo-fast`` command.

Anything a user can get wrong -- an argument, an input file, an output path, a checkpoint, a
cache -- ends in one line that names the argument or file and says what was expected, and exit
status 2. A bug (in our code or in a library) keeps its traceback, exit status 1.

What counts as the user's mistake (:func:`is_user_error`):

- a :class:`UserError` (raised by the path checks below and by the CLIs);
- an ``OSError`` that names a file (``FileNotFoundError``, ``PermissionError``, a full disk...);
- a ``ValueError``/``TypeError``/``KeyError`` raised by a ``raise`` statement of ``bpo_fast``
  itself: our checks name the argument (``"beta: expected > 0, got -1"``). The same types
  raised inside a library, or by the interpreter in our code (a bad unpacking), are bugs.

The path checks run before any work starts, so a typo in ``--out`` costs a second, not the
hours of a run that then cannot write its result.
"""

import argparse
import linecache
import os
import sys
import tempfile

__all__ = ["UserError", "is_user_error", "format_error", "run_command", "input_file",
           "input_dir", "output_file", "output_dir", "check_text_file", "int_at_least"]

EXIT_USER_ERROR = 2

_PACKAGE = os.path.dirname(os.path.realpath(__file__))
# our code: the package, and the Triton kernels it ships (bpo_fast/kernels may be a symlink)
_OURS = tuple(sorted({_PACKAGE + os.sep,
                      os.path.realpath(os.path.join(_PACKAGE, "kernels")) + os.sep}))


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and what was expected."""


def _last_frame(exc):
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last


def raised_here(exc):
    """True when the innermost frame of ``exc`` is a ``raise`` statement of ``bpo_fast``."""
    tb = _last_frame(exc)
    if tb is None:
        return False
    path = os.path.realpath(tb.tb_frame.f_code.co_filename)
    if not path.startswith(_OURS):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith(
        "raise")


def is_user_error(exc):
    """Whether ``exc`` is a mistake in the user's input (one line, exit 2) or a bug (traceback)."""
    if isinstance(exc, UserError):
        return True
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None:
        return True
    if isinstance(exc, (ValueError, TypeError, KeyError, OSError)):
        return raised_here(exc)
    return False


def format_error(exc):
    """One line: the exception's message (an ``OSError``: the file and the reason)."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None \
            and not isinstance(exc, UserError):
        msg = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def run_command(command, fn, *args):
    """Run a command's ``fn(*args)`` under the rule: user errors -> one line on stderr and 2."""
    try:
        return int(fn(*args) or 0)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"bpo-fast {command}: error: {format_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


# --------------------------------------------------------------------------------------------
# path checks (run before any work)
# --------------------------------------------------------------------------------------------

_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"PK\x03\x04", "a zip archive"),
          (b"\x1f\x8b", "a gzip file"), (b"\x7fELF", "an executable"), (b"%PDF", "a PDF"),
          (b"\x80\x02", "a pickle"), (b"BZh", "a bzip2 file"), (b"\xfd7zXZ", "an xz file"))


def _describe_binary(head):
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\x00" in head:
        return "binary data"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut by the read size
            return f"binary data (not UTF-8 at byte {exc.start})"
    return None


def check_text_file(path, arg, what="text file"):
    """Raise :class:`UserError` when ``path`` looks binary (an image, an archive, ...)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    kind = _describe_binary(head)
    if kind is not None:
        raise UserError(f"{arg}: {path!r} is not a {what} (it looks like {kind})")


def input_file(path, arg, *, what="file", text=False):
    """``path`` must be an existing, readable file (and text when ``text``); returns it."""
    if path is None or path == "":
        raise UserError(f"{arg}: required ({what})")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{arg}: {path!r} is a directory, expected a {what}")
    if not os.path.exists(path):
        raise UserError(f"{arg}: no such file {path!r} (expected a {what})")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{arg}: cannot read {path!r} ({exc.strerror})") from None
    if text:
        check_text_file(path, arg, what)
    return path


def input_dir(path, arg, *, what="directory"):
    if path is None or path == "":
        raise UserError(f"{arg}: required ({what})")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{arg}: no such directory {path!r} (expected a {what})")
    if not os.path.isdir(path):
        raise UserError(f"{arg}: {path!r} is a file, expected a {what}")
    return path


def _existing_ancestor(path):
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _probe_writable(directory, arg, target):
    # os.access says yes to root on a read-only mount; creating a file is the real test
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bpo_fast_probe_", dir=directory)
    except OSError as exc:
        raise UserError(f"{arg}: cannot write {target!r}: {directory!r} is not writable "
                        f"({exc.strerror})") from None
    os.close(fd)
    os.remove(tmp)


def output_file(path, arg, *, what="output file"):
    """``path`` can be written: not a directory, and its folder exists or can be created and is
    writable. Creates nothing."""
    if path is None or path == "":
        raise UserError(f"{arg}: required ({what})")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{arg}: {path!r} is a directory, expected a file path")
    anc = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(anc):
        raise UserError(f"{arg}: cannot write {path!r}: {anc!r} is a file, not a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{arg}: {path!r} is not writable")
    _probe_writable(anc, arg, path)
    return path


def output_dir(path, arg, *, what="output directory"):
    """``path`` is a writable directory or can be created as one. Creates nothing."""
    if path is None or path == "":
        raise UserError(f"{arg}: required ({what})")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{arg}: {path!r} is a file, expected a {what}")
    anc = _existing_ancestor(path)
    if not os.path.isdir(anc):
        raise UserError(f"{arg}: cannot create {path!r}: {anc!r} is a file, not a directory")
    _probe_writable(anc, arg, path)
    return path


# --------------------------------------------------------------------------------------------
# argparse types
# --------------------------------------------------------------------------------------------

def int_at_least(low):
    """An argparse ``type``: an integer >= ``low`` (argparse names the option in its error)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    parse.__name__ = f"int>={low}"
    return parse
