"""File versions: what backer keeps of a file before replacing or deleting it, and for how long.

Owns `FOLDER/.backer/versions/` (never synced): it mirrors the folder's directories and holds each
kept file or symlink as `stem~YYYYMMDD-HHMMSS.ext` (UTC, Syncthing's naming; `~1`, `~2`... before
the extension when one second holds several). `Versions` archives (one rename), lists, restores
(through `FOLDER/.backer/tmp/`) and prunes; `plan_prune` is the pure staggered retention rule.
Nothing here follows a symlink inside the folder. Imports errors and paths; nothing from
protocol, mesh or above. OS errors leave as BackerError subclasses or OSErrors with plain messages.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from backer.errors import FolderMissingError, InvalidPathError
from backer.paths import RESERVED_DIR, check_name, check_path, join, parent_of

__all__ = [
    "SYNCTHING_SCHEDULE",
    "TMP_DIR",
    "VERSIONS_DIR",
    "Schedule",
    "Version",
    "Versions",
    "plan_prune",
]

VERSIONS_DIR = "versions"
LATEST_FILE = "versions-latest"  # in .backer/: the latest time a version was named with
TMP_DIR = "tmp"
TIME_FORMAT = "%Y%m%d-%H%M%S"
_DAY = 86_400
_AREA_MODE = 0o700
_COPY_BUFFER = 1 << 20
_UNSYNCED_MAX = 256  # directories whose fsync may wait for `sync_pending`
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TAGGED = re.compile(r"(?P<stem>.+)~(?P<tag>\d{8}-\d{6})(?:~(?P<seq>[1-9]\d*))?", re.DOTALL)


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """Staggered retention. `steps` are (interval, until_age) pairs in seconds, by growing age: a
    version younger than `until_age` (and older than the previous step's) is kept only if it is
    at least `interval` newer than the last version kept before it; past the last step the last
    interval applies. Versions older than `max_age` are deleted, except a path's newest."""

    steps: tuple[tuple[int, int], ...]
    max_age: int

    def __post_init__(self) -> None:
        if not self.steps or self.max_age <= 0:
            raise ValueError("a schedule needs at least one step and a positive max_age")
        ages = [until for _, until in self.steps]
        if any(interval <= 0 for interval, _ in self.steps) or ages != sorted(set(ages)):
            raise ValueError("schedule intervals must be positive, until-ages strictly growing")

    def interval_at(self, age: float) -> int:
        for interval, until in self.steps:
            if age < until:
                return interval
        return self.steps[-1][0]


# Syncthing's staggered defaults (lib/versioner/staggered.go), with its third step written as
# 30 days: Syncthing's literal 592000 s (~6.9 days) is a typo for 2592000.
SYNCTHING_SCHEDULE = Schedule(
    steps=((30, 3600), (3600, _DAY), (_DAY, 30 * _DAY), (7 * _DAY, 365 * _DAY)),
    max_age=365 * _DAY,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Version:
    path: str  # the folder-relative path the version was archived from
    stored: Path  # where it is kept, under FOLDER/.backer/versions/
    time: datetime  # when it was archived (UTC, whole seconds, from the name)
    size: int  # bytes of the file, or of the symlink's target string


def plan_prune(
    times: Iterable[datetime], now: datetime, schedule: Schedule = SYNCTHING_SCHEDULE
) -> set[datetime]:
    """Which of one path's version times to delete (equal times count once). Syncthing's rule:
    oldest first, keep a version when it is at least its age's interval newer than the last one
    kept, so each interval keeps its oldest; drop those older than max_age. Unlike Syncthing, the
    newest is always kept, even past max_age: the last copy of a deleted file is never lost."""
    ordered = sorted(set(times))
    return {ordered[i] for i in _doomed(ordered, now, schedule)}


class Versions:
    """The versions area of one folder. Calls are serialised by a lock; use one per folder."""

    def __init__(self, folder: Path, *, schedule: Schedule = SYNCTHING_SCHEDULE) -> None:
        self.folder = folder
        self.root = folder / RESERVED_DIR / VERSIONS_DIR
        self.schedule = schedule
        self._lock = threading.RLock()
        self._unsynced: dict[tuple[int, int], int] = {}  # directories awaiting an fsync
        self._latest: int | None = None  # LATEST_FILE's value, read once

    def archive(
        self, rel_path: str, now: float, *, keep_in_place: bool = False, sync: bool = True
    ) -> Path | None:
        """Move the file or symlink at `rel_path` into the versions area with one rename and
        return where it went; None if there is nothing there. Refuses directories
        (IsADirectoryError) and parents that are symlinks or not directories (InvalidPathError).

        With `keep_in_place`, the version is a hard link and the file stays where it is, for a
        caller about to rename a replacement over it: the path is then never empty, even for
        an instant, so a crash in between cannot look like a deletion to the next scan.

        With `sync=False` (a plain move only), the two directories are fsynced by the next
        `sync_pending()` instead of now: one rename either happened or did not, so a crash
        before then loses nothing, as long as the caller records the deletion only after
        `sync_pending()` (a pull's commit does both, once for a whole batch)."""
        check_path(rel_path)
        parts = rel_path.split("/")
        with self._lock, _plain_errors("archive", rel_path), self._roots() as (top, marker):
            try:
                source = _walk(top, parts[:-1], rel_path)
            except FileNotFoundError:
                return None
            with _closing(source):
                try:
                    found = os.lstat(parts[-1], dir_fd=source)
                except FileNotFoundError:
                    return None
                if stat.S_ISDIR(found.st_mode):
                    raise IsADirectoryError(
                        f"{rel_path!r} is a directory: archive the files in it one by one"
                    )
                area = [VERSIONS_DIR, *parts[:-1]]
                with _closing(_walk(marker, area, rel_path, mode=_AREA_MODE)) as dest:
                    name = _free_name(dest, parts[-1], self._named_at(marker, now))
                    if not (keep_in_place and _linked(parts[-1], name, source, dest)):
                        _move_in(source, parts[-1], dest, name)
                    self._settle(dest, source, sync=sync or keep_in_place)
        return self.root.joinpath(*parts[:-1], name)

    def archive_from(
        self, source_dir: int, name: str, rel_path: str, now: float, *, sync: bool = True
    ) -> Path:
        """Move the file or symlink `name` in the open directory `source_dir` (where a swap
        left what it took out of the folder, or its own directory) into the area as a version
        of `rel_path`, with one rename; `sync` as in `archive`."""
        check_path(rel_path)
        parts = rel_path.split("/")
        with self._lock, _plain_errors("archive", rel_path), self._roots() as (_, marker):
            area = [VERSIONS_DIR, *parts[:-1]]
            with _closing(_walk(marker, area, rel_path, mode=_AREA_MODE)) as dest:
                stored = _free_name(dest, parts[-1], self._named_at(marker, now))
                _move_in(source_dir, name, dest, stored)
                self._settle(dest, source_dir, sync=sync)
        return self.root.joinpath(*parts[:-1], stored)

    def _named_at(self, marker: int, now: float) -> float:
        """The time a version archived at `now` is named with: never before one named already.
        Names are wall-clock times and a path's newest is the one with the latest name, so a
        clock set back (a dead RTC battery, a bad NTP step) would name the newest version as
        older than the ones before it, and pruning, which keeps only the newest past a year,
        would delete it once the clock is right again."""
        if self._latest is None:
            try:
                with _closing(os.open(LATEST_FILE, os.O_RDONLY, dir_fd=marker)) as fd:
                    self._latest = int(os.read(fd, 32).decode("ascii").strip() or 0)
            except (OSError, ValueError):
                self._latest = 0
        if now < self._latest:
            return float(self._latest)
        if int(now) > self._latest:
            self._latest = int(now)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            with (
                suppress(OSError),  # the next name tries again
                _closing(os.open(LATEST_FILE, flags, 0o600, dir_fd=marker)) as fd,
            ):
                os.write(fd, str(self._latest).encode("ascii"))
        return now

    def sync_pending(self) -> None:
        """fsync the directories of every archive made with `sync=False` since the last call."""
        with self._lock:
            pending, self._unsynced = self._unsynced, {}
            try:
                for fd in pending.values():
                    os.fsync(fd)
            finally:
                for fd in pending.values():
                    os.close(fd)

    def _settle(self, dest: int, source: int, *, sync: bool) -> None:
        """fsync the two directories of a move now, or at the next `sync_pending`."""
        for dir_fd in (dest, source):
            if sync:
                os.fsync(dir_fd)
            else:
                self._defer_sync(dir_fd)

    def _defer_sync(self, dir_fd: int) -> None:
        st = os.fstat(dir_fd)
        key = (st.st_dev, st.st_ino)
        if key not in self._unsynced:
            self._unsynced[key] = os.dup(dir_fd)
            if len(self._unsynced) > _UNSYNCED_MAX:  # bounded: each one holds a descriptor
                self.sync_pending()

    def list(self, rel_path: str) -> builtins.list[Version]:
        """The versions kept of `rel_path`, newest first."""
        check_path(rel_path)
        parts = rel_path.split("/")
        with self._lock, _plain_errors("list versions of", rel_path), self._roots() as (_, m):
            try:
                here = _walk(m, [VERSIONS_DIR, *parts[:-1]], rel_path)
            except FileNotFoundError:
                return []
            with _closing(here):
                found, _ = _scan(here, parent_of(rel_path), self.root.joinpath(*parts[:-1]))
        return sorted((v for v in found if v.path == rel_path), key=_order, reverse=True)

    def all(self) -> Iterator[Version]:
        """A snapshot of every version in the area, by path (sorted), each newest first."""
        with (
            self._lock,
            _plain_errors("list versions in", str(self.folder)),
            self._roots() as (_, marker),
        ):
            try:
                area = _walk(marker, [VERSIONS_DIR], str(self.root))
            except FileNotFoundError:
                return iter(())
            with _closing(area):
                return iter(builtins.list(_walk_area(area, "", self.root)))

    def restore(self, rel_path: str, when: datetime | None, now: float) -> Version:
        """Copy the version of `rel_path` from `when` (the second it was archived, UTC if naive;
        the last of that second; default the newest) back into place with its mode and mtime. The
        file it replaces is archived first; the version stays."""
        check_path(rel_path)
        parts = rel_path.split("/")
        with self._lock, _plain_errors("restore", rel_path), self._roots() as (top, marker):
            version = self._choose(rel_path, when)
            temp, placed = f"restore-{secrets.token_hex(8)}.tmp", False
            with _closing(_walk(marker, [TMP_DIR], rel_path, mode=_AREA_MODE)) as tmp:
                try:
                    # Copy, link the current file into the area, rename over it: the path is
                    # never vacant.
                    _copy_into(version.stored, tmp, temp)
                    self.archive(rel_path, now, keep_in_place=True)
                    with _closing(_walk(top, parts[:-1], rel_path, mode=0o777)) as parent:
                        os.rename(temp, parts[-1], src_dir_fd=tmp, dst_dir_fd=parent)
                        placed = True
                        os.fsync(parent)
                finally:
                    if not placed:
                        with suppress(FileNotFoundError):
                            os.unlink(temp, dir_fd=tmp)
        return version

    def prune(self, now: float) -> int:
        """Delete the versions the schedule lets go, per original path, and the empty
        directories of the area. Returns how many versions were deleted."""
        at = datetime.fromtimestamp(now, UTC)
        removed = 0
        with self._lock, _plain_errors("prune versions in", str(self.folder)):
            by_path: dict[str, builtins.list[Version]] = {}
            for version in self.all():
                by_path.setdefault(version.path, []).append(version)
            for versions in by_path.values():
                versions.sort(key=_order)
                for index in _doomed([v.time for v in versions], at, self.schedule):
                    with suppress(FileNotFoundError):
                        versions[index].stored.unlink()
                        removed += 1
            for directory, _, _ in os.walk(self.root, topdown=False):  # never enters symlinks
                if directory != str(self.root):
                    with suppress(OSError):  # not empty; else left for the next prune
                        os.rmdir(directory)
        return removed

    # -- helpers ---------------------------------------------------------------------------------

    def _choose(self, rel_path: str, when: datetime | None) -> Version:
        versions = self.list(rel_path)
        if when is not None:
            when = (when if when.tzinfo else when.replace(tzinfo=UTC)).replace(microsecond=0)
            versions = [v for v in versions if v.time == when]
        if versions:
            return versions[0]
        moment = "" if when is None else f" from {when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
        raise FileNotFoundError(f"no version of {rel_path!r}{moment} is kept")

    @contextmanager
    def _roots(self) -> Iterator[tuple[int, int]]:
        """Open the folder and its `.backer` marker; either missing is FolderMissingError."""
        try:
            top = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FolderMissingError(
                f"folder {self.folder} does not exist (is its disk mounted?)"
            ) from exc
        with _closing(top):
            try:
                marker = _open_dir(top, RESERVED_DIR, RESERVED_DIR, mode=None)
            except FileNotFoundError as exc:
                raise FolderMissingError(
                    f"{self.folder / RESERVED_DIR} is missing: the folder was never set up, "
                    "or its disk is not mounted"
                ) from exc
            with _closing(marker):
                yield top, marker


@contextmanager
def _plain_errors(action: str, what: str) -> Iterator[None]:
    """Give an OSError raised by the OS (it has errno and strerror) a plain message saying what
    we were doing; keep its type and errno. Errors we raised ourselves pass through."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.strerror is None:
            raise
        plain = type(exc)(f"cannot {action} {what!r}: {exc.strerror}")
        plain.errno = exc.errno
        raise plain from exc


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _open_dir(parent: int, name: str, rel: str, *, mode: int | None) -> int:
    """Open directory `name` in `parent` without following a symlink, creating it with `mode`
    unless that is None. A symlink or non-directory there is InvalidPathError."""
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if mode is None:
                raise
            os.mkdir(name, mode, dir_fd=parent)
            os.fsync(parent)
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            msg = f"cannot reach {rel!r}: {name!r} is a symlink or not a directory"
            raise InvalidPathError(msg) from exc
        raise


def _walk(top: int, parts: Sequence[str], rel: str, *, mode: int | None = None) -> int:
    """Open the directory `parts` below `top`, one component at a time (see `_open_dir`)."""
    fd = os.dup(top)
    try:
        for part in parts:
            child = _open_dir(fd, part, rel, mode=mode)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _split_ext(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 else (name, "")


def _tagged(name: str, when: datetime, seq: int) -> str:
    stem, ext = _split_ext(name)
    return f"{stem}~{when.strftime(TIME_FORMAT)}{f'~{seq}' if seq else ''}{ext}"


def _parse(name: str) -> tuple[str, datetime, int] | None:
    """(original name, time, sequence) of a version's file name, or None if it is not one."""
    base, ext = _split_ext(name)
    match = _TAGGED.fullmatch(base)
    if match is None:
        return None
    try:
        when = datetime.strptime(match["tag"], TIME_FORMAT).replace(tzinfo=UTC)
        original = check_name(match["stem"] + ext)
    except (ValueError, InvalidPathError):
        return None
    return original, when, int(match["seq"] or 0)


def _order(version: Version) -> tuple[datetime, int]:
    parsed = _parse(version.stored.name)
    return version.time, parsed[2] if parsed else 0


def _free_name(dest: int, name: str, now: float) -> str:
    """The version name for `name` archived at `now`: the first of its second, or one past the
    highest sequence that second already has."""
    when, seq = datetime.fromtimestamp(now, UTC).replace(microsecond=0), 0
    while _exists(dest, candidate := _tagged(name, when, seq)):
        if seq == 0:
            taken = (p[2] for n in os.listdir(dest) if (p := _parse(n)) and p[:2] == (name, when))
            seq = max(taken, default=0)
        seq += 1
    return candidate


def _exists(directory: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=directory)
    except FileNotFoundError:
        return False
    return True


def _scan(fd: int, rel_dir: str, stored_dir: Path) -> tuple[list[Version], list[str]]:
    """The versions in one directory of the area, and its subdirectories (never symlinks)."""
    versions: list[Version] = []
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif parsed := _parse(entry.name):
                path = join(rel_dir, parsed[0])
                try:
                    check_path(path)
                    size = entry.stat(follow_symlinks=False).st_size
                except (InvalidPathError, FileNotFoundError):
                    continue
                stored = stored_dir / entry.name
                versions.append(Version(path=path, stored=stored, time=parsed[1], size=size))
    return versions, sorted(subdirs)


def _walk_area(fd: int, rel_dir: str, stored_dir: Path) -> Iterator[Version]:
    versions, subdirs = _scan(fd, rel_dir, stored_dir)
    versions.sort(key=_order, reverse=True)
    yield from sorted(versions, key=lambda v: v.path)
    for name in subdirs:
        try:
            child = _open_dir(fd, check_name(name), name, mode=None)
        except (InvalidPathError, FileNotFoundError):
            continue
        with _closing(child):
            yield from _walk_area(child, join(rel_dir, name), stored_dir / name)


def _move_in(source: int, name: str, dest: int, stored: str) -> None:
    """Rename `name` in `source` to `stored` in `dest`; across filesystems (a folder's
    subdirectory that is its own mount), copy it whole under a name no version has, rename
    that, and only then delete the original. The caller fsyncs both directories."""
    try:
        os.rename(name, stored, src_dir_fd=source, dst_dir_fd=dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    temp = f".moving-{secrets.token_hex(8)}"  # never parsed as a version
    try:
        _copy_into(name, dest, temp, source_dir=source)
        os.rename(temp, stored, src_dir_fd=dest, dst_dir_fd=dest)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dest)
        raise
    os.fsync(dest)  # the copy is in the area for good before the original goes
    os.unlink(name, dir_fd=source)


def _copy_into(source: Path | str, tmp: int, temp: str, *, source_dir: int | None = None) -> None:
    """Copy a version (a file or a symlink, never followed) to `temp` in the open directory
    `tmp`, with the version's mode and mtime, and fsync it."""
    info = os.lstat(source, dir_fd=source_dir)
    times = (info.st_atime_ns, info.st_mtime_ns)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source, dir_fd=source_dir), temp, dir_fd=tmp)
        os.utime(temp, ns=times, dir_fd=tmp, follow_symlinks=False)
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with open(os.open(source, flags, dir_fd=source_dir), "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise ValueError(f"{source} is not a regular file or a symlink: cannot restore it")
        create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(temp, create, 0o600, dir_fd=tmp), "wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_BUFFER)
            writer.flush()
            os.fchmod(writer.fileno(), stat.S_IMODE(info.st_mode))
            os.utime(writer.fileno(), ns=times)
            os.fsync(writer.fileno())


def _doomed(ordered: Sequence[datetime], now: datetime, schedule: Schedule) -> list[int]:
    """Indices of `ordered` (oldest first) to delete; see `plan_prune`."""
    doomed: list[int] = []
    last_kept: datetime | None = None
    for index, when in enumerate(ordered[:-1]):  # the newest is always kept
        age = (now - when).total_seconds()
        if age > schedule.max_age or (
            last_kept is not None and (when - last_kept).total_seconds() < schedule.interval_at(age)
        ):
            doomed.append(index)
        else:
            last_kept = when
    return doomed


def _linked(name: str, version: str, source: int, dest: int) -> bool:
    """Hard-link `name` in `source` as `version` in `dest`; False where links are not possible
    (another filesystem mounted on the versions area, a filesystem without links)."""
    try:
        os.link(name, version, src_dir_fd=source, dst_dir_fd=dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    return True
