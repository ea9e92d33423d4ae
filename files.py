"""Writing outputs safely: atomic files, checks before a run starts, and a run lock.

A run never loses a user's file: every output is written to a temp file and renamed
into place; before any work starts, every output location is checked to be writable
and to differ from every input and from every other output; two runs cannot share a
checkpoint folder.
"""

import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import socket
import stat
import sys
import tempfile

from cli import UserError

_UMASK = os.umask(0o022)  # os.umask can only be read by setting it: set it back at once
os.umask(_UMASK)


class OutputError(UserError):
    """An output that cannot be written where the user asked."""


_WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO,
                 errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EBUSY, errno.EXDEV}


def _reason(error: OSError):
    hints = {errno.ENOSPC: "the disk is full; free space or choose another location",
             errno.EROFS: "read-only file system; choose a writable location",
             errno.EACCES: "permission denied; choose a writable location",
             errno.EDQUOT: "disk quota exceeded; free space or choose another location",
             # a file mounted on its own (docker -v host.csv:/work/sub.csv) cannot be renamed onto
             errno.EBUSY: "it is a mount point (a file mounted on its own?); write inside a mounted folder instead",
             errno.EXDEV: "it is on another file system than its folder (a file mounted on its own?); write inside "
                          "a mounted folder instead"}
    return hints.get(error.errno, f"{error.strerror or type(error).__name__}; choose a writable location")


@contextlib.contextmanager
def atomic_open(path, mode="w", together=None):
    """Open a temp file next to `path`; on success it is synced and renamed onto `path`.

    Readers see the old file or the complete new one, never a torn one, whatever happens
    mid-write (exception, Ctrl-C, kill -9, power loss); on an exception the temp file goes.
    An OSError (full disk, read-only file system) becomes an OutputError naming `path`.
    With `together` (the list `written_together` gives), the synced temp file is renamed
    when that block ends, with the others.
    """
    check_regular_file(path)
    target = os.path.realpath(path)  # through a symlink: replace its target, keep the link
    folder = os.path.dirname(target)
    made = _missing_folders(folder)  # removed again if the write fails: a failed command leaves nothing
    tmp_path = None
    try:
        os.makedirs(folder, exist_ok=True)
        extension = os.path.splitext(path)[1]
        fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-",  # a long "extension" must not make it too long
                                        suffix=extension if len(os.fsencode(extension)) <= 16 else "")
        # mkstemp makes 0600 files: keep the replaced file's permissions, else give the usual ones
        # (permission bits only: never a setuid or setgid bit on a file this suite writes)
        os.chmod(tmp_path, os.stat(target).st_mode & 0o777 if os.path.isfile(target) else 0o666 & ~_UMASK)
        # surrogateescape: a file name from argv that is not UTF-8 is written back as its own bytes
        text = {} if "b" in mode else {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}
        with open(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if together is None:
            os.replace(tmp_path, target)
        else:
            together.append((path, tmp_path, target, made))
        tmp_path = made = None
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:  # e.g. a read error in the caller's block: not ours
            raise
        raise _cannot_write(path, e) from None
    finally:
        _discard(tmp_path, made)


@contextlib.contextmanager
def written_together():
    """A list for `atomic_open(..., together=it)`: files that belong together (a submission and
    its probabilities) are each written and synced in their own block, then all renamed onto
    their paths when this block ends, and only if it ends without an error; otherwise their
    temp files go and every file stays as it was."""
    pending = []  # (path, temp file, target, folders made for it)
    try:
        yield pending
        _replace_all(pending)
    finally:
        for _, tmp_path, _, made in pending:
            _discard(tmp_path, made)


def _replace_all(pending):
    """Rename each pending temp file onto its target, emptying `pending`, with Ctrl-C and SIGTERM
    held until the last rename. If one fails, the targets already replaced get their old files
    back (kept meanwhile as hard links, where the file system has them), so the files never
    disagree."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    replaced = []  # (target, a hard link to its old file or None, whether it had one)
    try:
        while pending:
            path, tmp_path, target, _ = pending[0]
            existed = os.path.isfile(target)
            kept = _keep_old(target, tmp_path + ".old") if existed else None
            try:
                os.replace(tmp_path, target)
            except OSError as e:
                replaced = [(None, kept, False), *_put_back(replaced)]
                raise _cannot_write(path, e) from None
            replaced.append((target, kept, existed))
            pending.pop(0)
    finally:
        for _, kept, _ in replaced:
            if kept:
                with contextlib.suppress(OSError):
                    os.unlink(kept)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _keep_old(target, link):
    """`link`, a new hard link to `target`'s file, or None where the file system refuses it."""
    try:
        os.link(target, link)
        return link
    except OSError:
        return None


def _put_back(replaced):
    """Give each replaced target its old file again (a new one that had none goes); returns the
    links left over."""
    left = []
    for target, kept, existed in reversed(replaced):
        with contextlib.suppress(OSError):
            if kept:
                os.replace(kept, target)
                continue
            if not existed:
                os.unlink(target)
        left.append((None, kept, False))
    return left


def _discard(tmp_path, made):
    """Remove a temp file that was not renamed, and the folders made for it."""
    if tmp_path is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
    if made is not None:  # not written, whatever failed (the folders, the temp file, the write)
        _remove_empty(made)


def _cannot_write(path, error):
    return OutputError(f"{path}: cannot write: {_reason(error)}")


def _missing_folders(folder):
    """The folders on the way to `folder` that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_empty(folders):
    """Remove `folders` (deepest first) that a failed command made; one holding something stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def atomic_write_text(path, text):
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_bytes(path, data: bytes):
    with atomic_open(path, "wb") as f:
        f.write(data)


def check_regular_file(path, flag=None):
    """OutputError if `path` exists and is not a regular file (a device, pipe or socket, such
    as /dev/null or /dev/stdout): renaming a file onto it would replace it."""
    where = f"{flag} {path}" if flag else path
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError as e:
        if e.errno == errno.ELOOP:  # writing would replace the link itself
            raise OutputError(f"{where}: is a loop of symlinks; give a file path") from None
        return  # nothing there yet (or unreadable: the write itself will say)
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OutputError(f"{where}: is a device, pipe or socket, not a file; give a file path")


def _nearest_existing_folder(path):
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def check_output_folder(flag, folder, probed=None):
    """OutputError now unless `folder` (a --checkpoint-dir or --report) is, or can become, a
    folder this run writes in; the message names the folder as given, not a file in it."""
    try:
        mode = os.stat(folder).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{flag} {folder}: is a loop of symlinks; give a folder path") from None
        mode = None  # nothing there yet
    if mode is not None and not stat.S_ISDIR(mode):
        raise OutputError(f"{flag} {folder}: is a file, not a folder; give a folder path")
    holder_file = os.path.join(folder, HOLDER_FILE)
    if os.path.isdir(holder_file):
        raise OutputError(f"{flag} {folder}: the run's lock file {holder_file} is a folder; move it away")
    check_writable(flag, holder_file, probed, shown=folder)


def check_writable(flag, path, probed=None, shown=None):
    """OutputError now, before any work, unless a file can be written at `path` (named `shown`
    in the message, if given).

    Writes and syncs one byte to a real temp file in the nearest existing folder (permissions,
    read-only file systems and full disks all show up), and creates nothing else; once per
    folder in the set `probed`.
    """
    where = f"{flag} {shown or path}"
    if os.path.isdir(path):
        raise OutputError(f"{where}: is a folder; pass the path of a file in it")
    check_regular_file(path, flag)
    target = os.path.realpath(path)
    folder = _nearest_existing_folder(target)
    if not os.path.isdir(folder):
        raise OutputError(f"{where}: {folder} is a file, not a folder; choose another path")
    longest = os.pathconf(folder, "PC_NAME_MAX")  # bytes per name: 255 on most file systems
    for name in os.path.relpath(target, folder).split(os.sep):  # the names still to be made
        if len(os.fsencode(name)) > longest:
            raise OutputError(f"{where}: the name {name[:20]}... is {len(os.fsencode(name))} bytes, longer "
                              f"than the {longest} this file system allows; choose a shorter name")
    longest_path = os.pathconf(folder, "PC_PATH_MAX")  # 4096 bytes on Linux
    if len(os.fsencode(target)) >= longest_path:
        raise OutputError(f"{where}: the path is {len(os.fsencode(target)):,} bytes, longer than the "
                          f"{longest_path:,} this system allows; choose a shorter path")
    if probed is not None and folder in probed:
        return
    try:
        with tempfile.TemporaryFile(dir=folder) as probe:  # one byte, synced: a full disk fails here, not later
            probe.write(b"0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise OutputError(f"{where}: cannot write in {folder}: {_reason(e)}") from None
    if probed is not None:
        probed.add(folder)


def _identities(path):
    """The keys under which two paths are the same file: the resolved path and, for an existing
    file, its (device, inode), which also catches hard links; for a file still to be made, its
    nearest existing folder's (device, inode) and the rest of the path, which catches one
    folder reached by two paths (a bind mount)."""
    real = os.path.realpath(path)
    try:
        status = os.stat(path)
    except OSError:
        folder = _nearest_existing_folder(real)
        with contextlib.suppress(OSError):
            status = os.stat(folder)
            return [real, (status.st_dev, status.st_ino, os.path.relpath(real, folder))]
        return [real]
    return [real, (status.st_dev, status.st_ino)]


def _folders_above(real_path):
    """Every folder above `real_path`, nearest first, up to the root."""
    folder = os.path.dirname(real_path)
    while folder != os.path.dirname(folder):
        yield folder
        folder = os.path.dirname(folder)
    yield folder


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a kind of file this suite writes begins. An output replaces only such a file (an
    earlier run's) or an empty one: `--output data/train.csv`, or a report into a folder that
    holds the user's own index.html, must not replace the user's file."""
    name: str  # for the message: "a submission CSV"
    starts: bytes  # its first bytes
    holds: tuple = ()  # byte strings that are also in its first HEAD_BYTES bytes

    def wrote(self, head: bytes) -> bool:
        return head.startswith(self.starts) and all(part in head for part in self.holds)


HEAD_BYTES = 4096  # of an existing file: enough to tell each Kind


def read_head(path) -> bytes:
    """The first HEAD_BYTES of the regular file `path` (never a pipe: reading one would block)."""
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def check_replaces_only(flag, path, kind):
    """OutputError if `path` is an existing file (or a link to one) that holds something and is
    not a `kind` file, which an earlier run wrote and this one may replace."""
    if not os.path.isfile(path):
        return
    try:
        head = read_head(path)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot read it to tell whether an earlier run wrote it ({_reason(e)}); "
                          f"move that file or give another path") from None
    if head and not kind.wrote(head):
        raise OutputError(f"{flag} {path}: would replace a file that is not {kind.name} this suite wrote; "
                          f"move that file or give another path")


def check_outputs(outputs, inputs, reserved=()):
    """OutputError unless every output can be written and clobbers nothing it must not.

    outputs: [(flag, path, Kind)] of every file the run will write; inputs: paths it reads;
    reserved: [(path, why)] of paths no output may take. An output may not be an input (it
    would replace the user's data) or another output (one would overwrite the other), and
    replaces only a file of its Kind.
    """
    for flag, path, _ in outputs:
        if not path:  # before the comparisons: '' would resolve to the current folder
            raise OutputError(f"{flag} is empty; give a file path")
        if os.path.basename(path) in ("", ".", ".."):  # 'x/' or 'x/.': the checks below would not see x
            raise OutputError(f"{flag} {path}: ends in a folder, not a file name; give a file path")
    sources = {key: source for source in inputs if source for key in _identities(source)}
    reasons = {key: why for path, why in reserved for key in _identities(path)}
    written = {}  # each identity of an earlier output -> (flag, path)
    folders = {}  # each folder above an earlier output -> (flag, path); a dict each: n outputs in n steps
    for flag, path, _ in outputs:
        keys, folders_above = _identities(path), list(_folders_above(os.path.realpath(path)))
        for key in keys:
            if key in sources:
                raise OutputError(f"{flag} {path}: is an input of this run ({sources[key]}); "
                                  f"writing there would destroy it, so choose another path")
            if key in reasons and not os.path.lexists(path):  # an existing file: replaced only if this suite's
                raise OutputError(f"{flag} {path}: {reasons[key]}; choose another path")
            if key in written:
                raise OutputError(f"{flag} {path}: is also the {written[key][0]} output of this run; "
                                  f"give each output its own path")
        above = next((written[folder] for folder in folders_above if folder in written), None)
        if above:  # this file's folder would have to be the other's file, or the other way round
            raise OutputError(f"{above[0]} {above[1]}: is a folder of the {flag} output {path}, so "
                              f"it cannot be a file too; give each output its own path")
        if keys[0] in folders:
            other_flag, other = folders[keys[0]]
            raise OutputError(f"{flag} {path}: is a folder of the {other_flag} output {other}, so "
                              f"it cannot be a file too; give each output its own path")
        written.update(dict.fromkeys(keys, (flag, path)))
        folders.update(dict.fromkeys(folders_above, (flag, path)))
    probed = set()
    for flag, path, kind in outputs:
        if kind is HOLDER:  # a run's folder, named as given, not the lock file in it
            check_output_folder(flag, os.path.dirname(path), probed)
        else:
            check_writable(flag, path, probed)
        check_replaces_only(flag, path, kind)


HOLDER_FILE = ".digit-recognizer-run"  # in a locked folder: who holds it; a name no user file has
HOLDER = Kind("a run lock file", b"pid ")


def _holder(folder, otherwise):
    """The holder file's line while its process lives; else `otherwise`: a run in a folder inside
    holds a shared lock and writes no holder file here, and a killed run leaves a stale one.
    A process on another machine (a shared disk) cannot be looked up from here: its line stands."""
    with contextlib.suppress(OSError, ValueError, OverflowError), open(os.path.join(folder, HOLDER_FILE),
                                                                       encoding="utf-8", errors="replace") as f:
        line = f.read().strip()
        pid, host = line.partition(": ")[0].removeprefix("pid ").partition(" on ")[::2]
        if host in ("", socket.gethostname()):
            if int(pid) <= 0:  # os.kill would signal a process group
                raise ValueError(pid)
            with contextlib.suppress(PermissionError):  # another user's process: alive
                os.kill(int(pid), 0)  # ProcessLookupError once it is gone
        return line
    return otherwise


@contextlib.contextmanager
def folder_lock(folder, flag="--checkpoint-dir", held_above=None):
    """Hold an exclusive lock on `folder` for a run; a second run gets OutputError at once,
    also when one run's folder is inside the other's (it would overwrite its members).

    The locks are on the folders themselves (flock): exclusive on `folder`, shared on each
    folder above it. The OS frees them when the process dies, so a killed run never leaves
    a stale lock; HOLDER_FILE in the folder names the holder for the message and goes when the
    run ends. `held_above`: a folder above `folder` that this run already holds exclusively (its
    --report above its --checkpoint-dir), which no other run can take, so it takes no shared lock.
    """
    descriptors = []
    absolute = os.path.realpath(folder)  # 'x/../ck' must not make x; a link to a folder still to be made makes it
    made = _missing_folders(absolute)  # removed again if the run writes nothing in them
    try:
        try:
            os.makedirs(absolute, exist_ok=True)
            descriptors.append(os.open(absolute, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            raise OutputError(f"{flag} {folder}: cannot write: {_reason(e)}") from None
        _lock(folder, flag, held_above, descriptors)
        holder_file = os.path.join(absolute, HOLDER_FILE)
        atomic_write_text(holder_file, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(holder_file)
    except BaseException:  # refused, or stopped (Ctrl-C, an error) before a checkpoint was written
        _remove_empty(made)  # only the folders it made, and only while they are empty
        raise
    finally:
        for descriptor in descriptors:
            os.close(descriptor)  # releases the locks


def check_unlocked(folder, flag="--checkpoint-dir", held_above=None):
    """OutputError where folder_lock would raise one (another run holds `folder` or a folder
    above it), making nothing and holding nothing afterwards: --dry-run's check."""
    descriptors = []
    try:
        with contextlib.suppress(OSError):  # a folder still to be made: no run holds it
            descriptors.append(os.open(os.path.realpath(folder), os.O_RDONLY | os.O_DIRECTORY))
        _lock(folder, flag, held_above, descriptors)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _lock(folder, flag, held_above, descriptors):
    """Exclusive on `folder` where descriptors[0] is open on it, then shared on each folder above
    (opened and appended to `descriptors`, whose closing frees them); OutputError naming the run
    that holds one."""
    if descriptors:
        try:
            fcntl.flock(descriptors[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.path.realpath(folder), otherwise="a run in a folder inside it")
            raise OutputError(f"{flag} {folder}: in use by another run ({holder}); "
                              f"wait for it to finish or pass another {flag}") from None
    for above in _folders_above(os.path.realpath(folder)):
        if held_above and above == os.path.realpath(held_above):
            continue
        try:
            descriptors.append(os.open(above, os.O_RDONLY | os.O_DIRECTORY))
        except OSError:
            continue  # an unreadable folder above (or none yet): no run can lock it either
        try:
            fcntl.flock(descriptors[-1], fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(above, otherwise="pid unknown")
            raise OutputError(f"{flag} {folder}: is inside {above}, a folder another run holds ({holder}); "
                              f"wait for it to finish or pass a folder outside it") from None
        except OSError:
            continue  # a file system without flock up there: no run can hold it either
