"""Where runs and sweeps keep their files: a local folder, or a URI on a pyarrow filesystem.

``run.output_dir`` and ``sweep.output_dir`` accept what Ray Train and Ray Tune accept as
``storage_path``: a local path, or a URI that ``pyarrow.fs.FileSystem.from_uri`` resolves
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://namenode:8020/path``, ...), with
pyarrow's options as a query string (``s3://bucket/prefix?endpoint_override=10.0.0.5:9000&scheme=http``).
Credentials and endpoints come from the usual places of each filesystem (for S3 the
``AWS_*`` environment variables, e.g. ``AWS_ENDPOINT_URL`` for MinIO or another S3-compatible
server, or ``~/.aws``), on every node: Ray's workers write there directly.

:class:`StoragePath` is the one type the platform uses for a place in such storage, local
or remote: joined with ``/``, read, written, listed, uploaded to and downloaded from. Ray
Tune itself persists checkpoints and its experiment state to the same storage; everything
the platform writes beside them (``sweep.json``, ``summary.json``, ``final.json``, TensorBoard
events, ``results/``) goes through this module, and readers of a remote experiment
(``medalign status``, ``dashboard``, ``export``) work on a local mirror made by
:func:`mirror` (``$MEDALIGN_CACHE/remote/...``) and upload what they write back with
:meth:`StoragePath.upload`.

Writes are whole-file: a local file is written to a hidden sibling and renamed into place;
an object store makes a written object visible only once it is complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from ..common.atomic import write_text_atomic
from ..common.errors import ConfigError

CACHE_ENV = "MEDALIGN_CACHE"   # the platform's local cache; remote experiments are mirrored under it
MIRROR_DIR = "remote"          # $MEDALIGN_CACHE/remote/<hash>/<name>: local copies of remote experiments
PRIVATE_MODE = 0o700           # experiment folders and mirrors: only their owner may read or write them
SETTLE_S = 5.0                 # a remote file changed this recently is always fetched again (see mirror)


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a remote URI (``s3://``, ``gs://``, ...); ``file://`` counts as local."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.isidentifier()


def local_path(path: str | os.PathLike) -> Path:
    """A local path, absolute, with ``~`` and a ``file://`` prefix resolved."""
    text = str(path)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser().resolve()


def normalize(location: str | os.PathLike) -> str:
    """The canonical text of a storage location: an absolute local path, or the URI without a
    trailing slash (its query string kept)."""
    if isinstance(location, StoragePath):
        return location.uri
    if not is_uri(location):
        return str(local_path(location))
    parts = urlsplit(str(location))
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def join(location: str | os.PathLike, *names: str) -> str:
    """``location/names...``; for a URI the names go before its query string."""
    text = normalize(location)
    clean = [str(n).strip("/") for n in names if str(n).strip("/")]
    if not is_uri(text):
        return str(Path(text, *clean))
    parts = urlsplit(text)
    path = "/".join([parts.path.rstrip("/"), *clean]) if clean else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# Environment variables that configure pyarrow's filesystems (endpoints, credentials, regions):
# a cached filesystem is only reused while they are unchanged.
FS_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_", "CLOUDSDK_")


def _fs_environment() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(FS_ENV_PREFIXES)))


@functools.lru_cache(maxsize=32)
def _cached_root_filesystem(root: str, environment: tuple):
    """``(filesystem, root fs path)`` of a URI's scheme, host and options, for one environment
    (cached: an S3 client is built once per bucket, endpoint and credentials)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(root)
    except (ValueError, OSError) as error:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise ConfigError(f"cannot open storage {root!r}: {error}; use a local path or a URI that pyarrow "
                          f"knows (s3://bucket/prefix, gs://bucket/prefix, hdfs://host:port/path)") from error


def _root_filesystem(root: str):
    return _cached_root_filesystem(root, _fs_environment())


def resolve(location: str | os.PathLike):
    """``(pyarrow filesystem, path on it)`` of a location, as Ray's ``storage_path`` resolves it."""
    import pyarrow.fs as pafs

    text = normalize(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), text
    parts = urlsplit(text)
    fs, root_path = _root_filesystem(urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")))
    path = (root_path.rstrip("/") + parts.path) if parts.path else root_path
    return fs, path


class StoragePath:
    """A file or folder on local disk or on a pyarrow filesystem.

    Args:
        location: a local path (made absolute) or a URI (``s3://bucket/prefix?options``).

    ``str()`` gives the location back (what to print, record, or hand to Ray as
    ``storage_path``); :attr:`fs` / :attr:`path` are what pyarrow calls take.
    """

    __slots__ = ("uri", "fs", "path")

    def __init__(self, location: str | os.PathLike | "StoragePath"):
        self.uri = normalize(location)
        self.fs, self.path = resolve(self.uri)

    @classmethod
    def _child(cls, parent: "StoragePath", name: str) -> "StoragePath":
        """``parent / name`` on the parent's filesystem (no new resolution)."""
        child = cls.__new__(cls)
        child.uri = join(parent.uri, name)
        child.fs = parent.fs
        clean = "/".join(part for part in str(name).split("/") if part)
        child.path = f"{parent.path.rstrip('/')}/{clean}" if clean else parent.path
        return child

    # ----------------------------------------------------------------- naming
    @property
    def is_remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> "StoragePath":
        if not self.is_remote:
            return StoragePath(Path(self.uri).parent)
        parts = urlsplit(self.uri)
        return StoragePath(urlunsplit((parts.scheme, parts.netloc, str(PurePosixPath(parts.path).parent).rstrip("/"),
                                       parts.query, "")))

    def __truediv__(self, name: str) -> "StoragePath":
        return StoragePath._child(self, name)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def local(self) -> Path:
        """This location as a local ``Path``.

        Raises:
            ConfigError: it is remote (use :func:`mirror` for a local copy).
        """
        if self.is_remote:
            raise ConfigError(f"{self.uri} is remote storage; this step needs a local folder")
        return Path(self.uri)

    # ----------------------------------------------------------------- queries
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def size(self) -> int | None:
        """The file's size in bytes, or None when it is missing or a folder."""
        info = self._info()
        return info.size if info.is_file else None

    def iterdir(self) -> list["StoragePath"]:
        """The entries directly inside this folder (empty when it does not exist)."""
        return [self / PurePosixPath(info.path).name for info in self._listing(recursive=False)]

    def files(self) -> dict[str, tuple[int, float]]:
        """Every file under this folder: ``{relative posix path: (size, mtime seconds)}``."""
        import pyarrow.fs as pafs

        found = {}
        base = self.path.rstrip("/") + "/"
        for info in self._listing(recursive=True):
            if info.type == pafs.FileType.File and info.path.startswith(base):
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                found[info.path[len(base):]] = (info.size, mtime)
        return found

    def _listing(self, recursive: bool):
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # ----------------------------------------------------------------- reading
    def read_bytes(self) -> bytes:
        """The file's content.

        Raises:
            FileNotFoundError: no such file.
        """
        if not self.is_remote:
            return Path(self.uri).read_bytes()
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.uri}: no such file") from error
        except OSError as error:  # pyarrow reports a missing object on some stores as a plain IOError
            if not self.is_file():
                raise FileNotFoundError(f"{self.uri}: no such file") from error
            raise

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self):
        return json.loads(self.read_text())

    # ----------------------------------------------------------------- writing
    def mkdir(self, private: bool = False) -> "StoragePath":
        """Creates this folder (and its parents); ``private``: mode 0700 for a local folder."""
        if self.is_remote:
            self.fs.create_dir(self.path, recursive=True)
            return self
        folder = Path(self.uri)
        folder.mkdir(parents=True, exist_ok=True)
        if private:
            os.chmod(folder, PRIVATE_MODE)
        return self

    def write_bytes(self, data: bytes) -> "StoragePath":
        """Writes the whole file: readers see the old content or the new one, never a part."""
        if not self.is_remote:
            path = Path(self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return self
        with self.fs.open_output_stream(self.path) as stream:  # the object appears when the stream closes
            stream.write(data)
        return self

    def write_text(self, text: str) -> "StoragePath":
        if not self.is_remote:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(self.uri), text)
            return self
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, data, *, indent: int = 1) -> "StoragePath":
        """JSON with sorted keys, written whole (as :func:`~medalign_platform.common.atomic.write_json_atomic`)."""
        return self.write_text(json.dumps(data, indent=indent, sort_keys=True))

    def remove(self) -> None:
        """Deletes this file or folder (nothing when it is missing)."""
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.Directory:
            if self.is_remote:
                self.fs.delete_dir(self.path)
            else:
                shutil.rmtree(self.uri, ignore_errors=True)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # ----------------------------------------------------------------- copying
    def upload(self, local_dir: str | os.PathLike, *, replace: bool = False,
               skip: Callable[[str], bool] | None = None) -> int:
        """Copies the files of a local folder into this folder.

        Args:
            local_dir: the source folder.
            replace: first delete what this folder holds (a rebuilt folder whose file names
                changed, e.g. TensorBoard events, must not keep the old files beside the new).
            skip: ``relative posix path -> bool``: files not to copy.

        Returns:
            the number of files copied. Unchanged files (same size, not newer) are skipped.
        """
        source = Path(local_dir)
        if replace:
            self.remove()
        existing = {} if replace else self.files()
        copied = 0
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = file.relative_to(source).as_posix()
            if relative.startswith(".") or "/." in relative or (skip and skip(relative)):
                continue  # hidden files: temporary siblings of atomic writes
            stat = file.stat()
            known = existing.get(relative)
            if known and known[0] == stat.st_size and known[1] >= int(stat.st_mtime):
                continue  # object stores keep whole seconds
            (self / relative).write_bytes(file.read_bytes())
            copied += 1
        return copied

    def download(self, local_dir: str | os.PathLike, *, skip: Callable[[str], bool] | None = None,
                 prune: bool = True) -> int:
        """Makes ``local_dir`` a copy of this folder's files (those ``skip`` does not exclude).

        A local copy with the remote file's size and modification time is kept (the local
        file's mtime is set to the remote one), except for files the store changed in the last
        few seconds, which are fetched again (object stores keep mtimes to the second).

        Args:
            local_dir: the local folder (created).
            skip: ``relative posix path -> bool``: remote files not to copy.
            prune: delete local files (not excluded by ``skip``) that the remote folder lacks.

        Returns:
            the number of files fetched.
        """
        target = Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        remote = {rel: info for rel, info in self.files().items() if not (skip and skip(rel))}
        fetched = 0
        now = time.time()
        for relative, (size, mtime) in remote.items():
            local = target / relative
            try:
                stat = local.stat()
                if stat.st_size == size and int(stat.st_mtime) == int(mtime) and now - mtime > SETTLE_S:
                    continue
            except OSError:
                pass
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.download")
            tmp.write_bytes((self / relative).read_bytes())
            os.utime(tmp, (mtime, mtime))
            os.replace(tmp, local)
            fetched += 1
        if prune:
            for file in [p for p in target.rglob("*") if p.is_file()]:
                relative = file.relative_to(target).as_posix()
                if relative not in remote and not (skip and skip(relative)):
                    file.unlink()
        return fetched


def cache_root() -> Path:
    """``$MEDALIGN_CACHE``, else ``~/.cache/medalign`` (where prepared data and mirrors live)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/medalign").expanduser()


def mirror_dir(location: str | os.PathLike | StoragePath) -> Path:
    """The local folder that mirrors a remote experiment or run: ``$MEDALIGN_CACHE/remote/<hash>/<name>``.

    The folder keeps the remote folder's name (TensorBoard and the printed paths show it);
    the hash of the full URI keeps two remote folders of the same name apart.
    """
    uri = normalize(location)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / MIRROR_DIR / digest / (StoragePath(uri).name or "root")


def mirror(location: str | os.PathLike | StoragePath, *, skip: Callable[[str], bool] | None = None) -> Path:
    """A local folder holding this location's files: itself when it is local, else an
    up-to-date copy in :func:`mirror_dir` (fetched incrementally; created with mode 0700).

    Args:
        location: the folder.
        skip: ``relative posix path -> bool``: remote files not to fetch (checkpoints, say).
    """
    place = location if isinstance(location, StoragePath) else StoragePath(location)
    if not place.is_remote:
        return place.local()
    target = mirror_dir(place)
    target.mkdir(parents=True, exist_ok=True)
    for folder in (target.parent.parent, target.parent, target):
        os.chmod(folder, PRIVATE_MODE)  # the mirror holds trial records that resume trusts
    place.download(target, skip=skip)
    return target


def relocate(value, local: str | os.PathLike, remote: str | StoragePath):
    """``value`` (nested dicts, lists, strings) with paths inside the local mirror ``local``
    rewritten to the remote location they mirror (what a user of a remote experiment should see)."""
    prefix, target = str(local), str(remote)
    if isinstance(value, str):
        if value == prefix or value.startswith(prefix + os.sep):
            return join(target, value[len(prefix):].lstrip(os.sep).replace(os.sep, "/"))
        return value
    if isinstance(value, dict):
        return {key: relocate(item, prefix, target) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocate(item, prefix, target) for item in value)
    return value
