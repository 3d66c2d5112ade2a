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

What a command may touch (:class:`CommandGuard`, entered by every command around its work):

- **Outputs never overlap inputs.** Each command declares its inputs and outputs; before any
  work an output that is an input (the same file after resolving links), lies inside an input
  directory (a model folder, a checkpoint), or is a directory that holds an input, is refused
  naming both. Two exceptions, declared as such: an image root is read by name, so outputs may
  live inside it (``ROOT``); a checkpoint of the run's own output folder is an input the output
  holds by design (``OWNED``). Two outputs of one command never are the same file.
- **One run per output.** Each output is locked (``flock`` on a lock file beside it, or inside
  an output folder): a second run into the same output stops at once naming the first (its pid).
  The kernel drops the lock when the process ends, however it ends, so no crash leaves a stale
  lock; the lock file is removed on a normal exit.
- **Ctrl-C** ends the command with one line saying where it stopped, what is kept and how to
  resume, exit status 130 (:class:`Interrupted`, a ``KeyboardInterrupt`` for Python callers).
  What is kept is what the command's fault-safe writers left: appended batches, complete
  checkpoints, atomically renamed files; a second Ctrl-C is not needed.
- **A write that fails for a reason of the system** (a full disk, a quota, a read-only or failing
  device, a permission taken away) ends in one line naming the file, where the command stopped,
  what is kept and how to resume once the cause is fixed, exit status 2 (:class:`WriteFault`).
  Libraries report a full disk in their own ways (safetensors' error, torch's ``unexpected
  pos``, DCP's ``CheckpointException``): :func:`writing` around a write recognises them.
"""

import contextlib
import errno
import linecache
import logging
import os
import sys
import tempfile

__all__ = ["UserError", "is_user_error", "format_error", "run_command", "input_file",
           "input_dir", "output_file", "output_dir", "check_text_file", "CommandGuard",
           "check_no_overlap", "lies_inside", "Interrupted", "WriteFault", "writing",
           "appended_status", "FILE", "DIR", "ROOT", "OWNED"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130      # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

logger = logging.getLogger("bpo_fast")

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
    if isinstance(exc, WriteFault):
        msg = str(exc)
    elif isinstance(exc, OSError) and getattr(exc, "filename", None) is not None \
            and not isinstance(exc, UserError):
        msg = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def run_command(command, fn, *args):
    """Run a command's ``fn(*args)`` under the rule: user errors -> one line on stderr and 2;
    Ctrl-C -> one line (where it stopped, what is kept, how to resume: :class:`CommandGuard`)
    and 130."""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt as exc:
        print(f"bpo-fast {command}: {exc if isinstance(exc, Interrupted) else 'interrupted'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
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
# what a command may touch: outputs never overlap inputs, one run per output, Ctrl-C and a
# failed write end in one line that says what is kept
# --------------------------------------------------------------------------------------------

FILE = "file"    # an input or output file
DIR = "dir"      # a directory read (model, checkpoint) or written (--output) as a whole
ROOT = "root"    # an input directory read by name (images): outputs may live inside it
OWNED = "owned"  # an input inside an output folder that the output holds by design (a checkpoint)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says where the command stopped, what is kept and how to
    resume (``str(exc)``). A ``KeyboardInterrupt``: Python callers see what they expect."""


class WriteFault(OSError):
    """A write failed for a reason of the system (full disk, quota, read-only or failing device,
    a permission taken away): one line naming the file; the command's guard adds where it
    stopped, what is kept and how to resume (``note``)."""

    note = ""

    def __str__(self):
        what = self.strerror or os.strerror(self.errno or 0)
        return (f"{self.filename}: {what}" if self.filename else what) + self.note


# the errnos of a disk fault, whatever was being done, and what fixes each
_DISK_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (or raise the "
                "quota)", errno.EFBIG: "free some space (or raise the file size limit)",
                errno.EROFS: "make it writable", errno.EIO: "check the device"}
# on a write (:func:`writing`) any OSError is the system's; these fixes too
_FIXES = {**_DISK_ERRNOS, errno.EACCES: "make it writable", errno.EPERM: "make it writable"}
# how libraries that do not raise OSError spell these (safetensors, torch, DCP)
_DISK_TEXT = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
              ("File too large", errno.EFBIG), ("Read-only file system", errno.EROFS),
              ("os error 28", errno.ENOSPC), ("os error 122", errno.EDQUOT))
_FULL_BYTES = 1 << 20   # a file system with less free space than this is full


def _chain(exc):
    """``exc`` and the exceptions it was raised from (``raise ... from None`` ends the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else (
            None if exc.__suppress_context__ else exc.__context__)


def _wraps_interrupt(exc):
    """Whether ``exc`` is a Ctrl-C that is not a ``KeyboardInterrupt`` itself: a library caught
    it and raised its own exception (DCP collects each rank's exception, the
    ``KeyboardInterrupt`` included, into a ``CheckpointException``'s ``failures``)."""
    if isinstance(exc, KeyboardInterrupt):
        return False
    for e in _chain(exc):
        if isinstance(e, KeyboardInterrupt):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():
                if isinstance(v[0] if isinstance(v, tuple) and v else v, KeyboardInterrupt):
                    return True
    return False


def _disk_full(path):
    """Whether the file system holding ``path`` (or its nearest existing folder) is full."""
    try:
        st = os.statvfs(_existing_ancestor(path))
    except (OSError, AttributeError):
        return False
    free = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize < _FULL_BYTES


def _as_fault(exc, path, *, any_oserror=False, check_free=False):
    """The :class:`WriteFault` ``exc`` amounts to, or None: an ``OSError`` with a system errno
    (any errno with ``any_oserror``: it happened on a write), a library error that spells one,
    or (``check_free``: a write of ``path`` just failed) any error while the disk is full."""
    if isinstance(exc, WriteFault):
        return exc
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None and (any_oserror
                                                               or e.errno in _DISK_ERRNOS):
            return WriteFault(e.errno, e.strerror or os.strerror(e.errno), e.filename or path)
        text = str(e)
        for phrase, code in _DISK_TEXT:
            if phrase in text:
                return WriteFault(code, os.strerror(code), path)
    if check_free and path is not None and _disk_full(path):
        return WriteFault(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return None


@contextlib.contextmanager
def writing(path, cleanup=None):
    """Around a write of ``path`` (a file or a folder being filled): an ``OSError``, or a full
    disk however a library reports it, is re-raised as one :class:`WriteFault` naming ``path``;
    a Ctrl-C a library wrapped (DCP's ``CheckpointException``) as the ``KeyboardInterrupt`` it
    is; ``cleanup()`` runs first on any failure (e.g. removes a half-written temporary). A bug
    keeps its own exception."""
    try:
        yield
    except BaseException as exc:
        fault = None
        if _wraps_interrupt(exc):
            if cleanup is not None:
                cleanup()
            raise KeyboardInterrupt() from exc
        if not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            fault = _as_fault(exc, os.fspath(path), any_oserror=True, check_free=True)
        if cleanup is not None:
            cleanup()
        if fault is None or fault is exc:
            raise
        raise fault from exc


def _real(path):
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child, parent):
    """``child`` is ``parent`` or lies under it (both real paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def lies_inside(path, folder):
    """Whether ``path`` is ``folder`` or lies under it, after resolving links."""
    return _inside(_real(path), _real(folder))


def _same_file(a, b):
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)       # a hard link
    except OSError:
        return False


def _declared(items, default_kind):
    """``[(arg, path, kind)]`` from ``{arg: path}`` / ``{arg: (path, kind)}`` / tuples; empty
    paths are dropped (an option not given)."""
    items = items.items() if isinstance(items, dict) else items
    out = []
    for item in items:
        arg, value = item[0], item[1:] if len(item) > 2 else item[1]
        path, kind = value if isinstance(value, tuple) else (value, None)
        if path in (None, "", False, True):
            continue
        path = os.fspath(path)
        out.append((arg, path, kind or (DIR if os.path.isdir(path) else default_kind)))
    return out


# what no bpo-fast output ever is (JSON, JSONL, safetensors); not the pickle magic, which the
# 8-byte header length that starts a safetensors file can spell
_NEVER_WRITTEN = tuple((m, k) for m, k in _MAGIC if m != b"\x80\x02")


def _never_written(path):
    """The kind of the existing file ``path`` when no bpo-fast command writes such a file (an
    image, an archive, a PDF, an executable), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    return next((k for m, k in _NEVER_WRITTEN if head.startswith(m)), None)


def check_no_overlap(outputs, inputs, command="bpo-fast"):
    """Raise :class:`UserError` when an output would write over an input: the same file after
    resolving links (or a hard link), an output inside an input directory (``DIR``), or an
    output directory that holds an input (not an ``OWNED`` one); or when two outputs are the
    same file. ``outputs``/``inputs``: ``{arg: path}`` or ``{arg: (path, kind)}``."""
    outs, ins = _declared(outputs, FILE), _declared(inputs, FILE)
    for oarg, opath, okind in outs:
        oreal = _real(opath)
        kind = _never_written(opath) if okind == FILE else None
        if kind is not None:  # e.g. an image of the data inside an image root (ROOT)
            raise UserError(f"{oarg}: {opath!r} is {kind}, not written by {command} (no "
                            f"bpo-fast command writes one); it is left as it is: choose another "
                            f"{oarg}")
        for iarg, ipath, ikind in ins:
            ireal = _real(ipath)
            if _same_file(opath, ipath):
                what = "folder" if os.path.isdir(ipath) else "file"
                raise UserError(f"{oarg}: {opath!r} is the same {what} as the input {iarg} "
                                f"({ipath!r}); the command would write over what it reads: "
                                f"choose another {oarg}")
            if ikind == DIR and _inside(oreal, ireal):
                raise UserError(f"{oarg}: {opath!r} lies inside the input {iarg} ({ipath!r}); "
                                f"the command would write into what it reads: choose an {oarg} "
                                f"outside it")
            if okind == DIR and ikind != OWNED and _inside(ireal, oreal):
                raise UserError(f"{oarg}: the output folder {opath!r} holds the input {iarg} "
                                f"({ipath!r}); keep inputs outside the output folder or choose "
                                f"another {oarg}")
    for i, (a, pa, _) in enumerate(outs):
        for b, pb, _ in outs[i + 1:]:
            if _same_file(pa, pb):
                raise UserError(f"{b}: {pb!r} is also {a}; two outputs of one command must "
                                f"differ")


class _OutputLock:
    """An exclusive ``flock`` on a lock file beside an output file (``.<name>.lock``) or inside
    an output folder (``.bpo-fast.lock``). The kernel drops it when the process ends, however it
    ends (no stale lock after a crash); on release the file is removed while still locked, and a
    waiter that locked the removed file sees it is gone and retries. File systems without
    ``flock`` (some network mounts) run unlocked, with a warning.

    Not ``filelock``: its lock file stays behind after every run, and where ``flock`` is missing
    it falls back to a lock that a crash leaves in place."""

    def __init__(self, arg, path, kind, command):
        self.arg, self.path, self.command = arg, path, command
        # beside the real path: a second run that names the output through a symlink (to the
        # file or to a folder above it) locks the same file
        if kind == DIR:
            self.file = os.path.join(_real(path), ".bpo-fast.lock")
        else:
            folder, name = os.path.split(_real(path))
            self.file = os.path.join(folder, f".{name}.lock")
        self.fd, self.created = None, []

    def _check_foreign(self):
        """A file at the lock's path that no bpo-fast run wrote (a link, or content other than
        ``pid N: bpo-fast ...``) is the user's: refused, never truncated or removed."""
        if not os.path.lexists(self.file):
            return
        own = not os.path.islink(self.file) and os.path.isfile(self.file)
        if own:
            try:
                with open(self.file, "rb") as f:
                    head = f.read(64)
            except OSError:
                head = b"?"
            own = head == b"" or head.startswith(b"pid ")
        if not own:
            raise UserError(f"{self.arg}: {self.file!r} (the lock file of {self.path!r}) exists "
                            "and was not written by bpo-fast; it is left as it is: move it "
                            f"away, or choose another {self.arg}")

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        folder = os.path.dirname(os.path.abspath(self.file))
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for d in reversed(missing):
            os.makedirs(d, exist_ok=True)
        self.created = missing  # deepest first: removed again on release when left empty
        try:
            self._check_foreign()
        except UserError:
            self._remove_created()
            raise
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                self._remove_created()
                raise UserError(f"{self.arg}: {self.path!r} is being written by another run "
                                f"({holder}); wait for it to end, or choose another "
                                f"{self.arg}") from None
            except OSError as exc:
                os.close(fd)
                logger.warning("%s: %s cannot be locked (%s); not protected against a second run "
                               "into it", self.arg, self.path, exc.strerror)
                return self
            try:
                a, b = os.fstat(fd), os.stat(self.file)
                current = (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)    # its holder released and removed it meanwhile: lock the new file
        self.fd = fd
        try:  # who holds it, for the message of a second run; the lock needs no content
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: bpo-fast {self.command}".encode())
        except OSError:  # a full disk: the command's own writes will say so, naming their file
            pass
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.file)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self):
        for d in self.created:
            try:
                os.rmdir(d)
            except OSError:
                break
        self.created = []


def appended_status(out, written, noun):
    """``(where, kept, how to resume)`` of a command that appends its output batch by batch and
    resumes with ``--resume`` (``out`` None: nothing written yet), for :class:`CommandGuard`."""
    if out is None:
        return f"before any {noun} was written", "", "rerun the same command"
    return (f"after {written} new {noun}(s)",
            f"the {noun}s written so far are kept in {out!r} (appended batch by batch)",
            "rerun with --resume to continue")


class CommandGuard:
    """``with CommandGuard(command, inputs=..., outputs=...) as g:`` around a command's work.

    On entry: :func:`check_no_overlap`, then a lock on every output (``lock=False``: none, e.g.
    ranks that do not own the output). On the way out: a ``KeyboardInterrupt`` becomes
    :class:`Interrupted`, and a failed write (:func:`writing`, or an ``OSError`` of the disk)
    a :class:`WriteFault`, each with one line built from ``g.status()``: ``(where it stopped,
    what is kept, how to resume)``; a command sets ``g.status`` to a function of its progress.
    The default says nothing was written (commands that write their outputs whole).

    Guards nest (the demo runs build-pairs and train): the outermost one's line wins."""

    def __init__(self, command, *, inputs=(), outputs=(), lock=True, status=None):
        self.command = command
        self.inputs, self.outputs = inputs, outputs
        self.lock = lock
        self.status = status or self._written_whole
        self._locks = []

    def _written_whole(self):
        outs = ", ".join(repr(p) for _, p, _ in _declared(self.outputs, FILE))
        return "", f"nothing was written ({outs or 'the output'} is written whole or not at all)", \
            "rerun the same command"

    def __enter__(self):
        check_no_overlap(self.outputs, self.inputs, self.command)
        if self.lock:
            try:
                for arg, path, kind in _declared(self.outputs, FILE):
                    self._locks.append(_OutputLock(arg, path, kind, self.command).acquire())
            except BaseException:
                self._release()
                raise
        return self

    def _release(self):
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    def _says(self):
        try:
            where, kept, resume = self.status()
        except Exception as exc:  # the line must come out even if progress is half set up
            logger.debug("status of %s failed: %r", self.command, exc)
            where, kept, resume = "", "", "rerun the same command"
        return where, kept, resume

    def __exit__(self, typ, exc, tb):
        self._release()
        if exc is None:
            return False
        if isinstance(exc, KeyboardInterrupt) or _wraps_interrupt(exc):
            where, kept, resume = self._says()
            parts = ["interrupted" + (f" {where}" if where else "")] + [p for p in (kept, resume)
                                                                         if p]
            raise Interrupted("; ".join(parts)) from None
        # DCP's errors are BaseExceptions; a UserError already says what is wrong
        if not isinstance(exc, (SystemExit, GeneratorExit, UserError)):
            fault = _as_fault(exc, None)
            if fault is not None:
                where, kept, resume = self._says()
                fix = _FIXES.get(fault.errno, "fix the cause")
                if fault.filename is None:
                    fault.filename = ", ".join(p for _, p, _ in _declared(self.outputs, FILE)) \
                        or None
                fault.note = (f" ({where})" if where else "") + (f"; {kept}" if kept else "") + \
                    f"; {fix}, then {resume}"
                if fault is exc:
                    return False
                raise fault from exc
        return False
