"""Where a sweep's Optuna study lives (``sweep.storage``) and how every reader opens it.

=====================================  ===================================================
``sweep.storage``                      the study
=====================================  ===================================================
null / ``sqlite`` (default)            ``EXP_DIR/optuna.db``, SQLite (one writer: the driver)
``journal``                            ``EXP_DIR/optuna.journal``, Optuna's journal file
``/path/to/study.journal`` (``.log``)  that journal file (e.g. on NFS, where SQLite locks fail)
``postgresql://user@host:5432/db``     any SQLAlchemy URL Optuna's ``RDBStorage`` takes
``mysql+pymysql://...``, ...           (``sqlite:///abs/path.db`` included)
=====================================  ===================================================

The study name is the sweep name. File studies sit beside ``sweep.json``, so a moved
experiment folder keeps its study; a database study outlives any node, which is what a
multi-node cluster wants. For an experiment on remote storage (``s3://...``) a file study
is kept on the driver (a private folder beside the experiment's local mirror) and copied to
the experiment folder while the sweep runs (:class:`StudyUploader`) and at its end.

A URL must not carry a password: ``sweep.json`` records the setting. PostgreSQL's client
library reads ``PGPASSWORD`` or ``~/.pgpass`` instead (on the driver, and wherever
``medalign status`` runs).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError

logger = logging.getLogger(__name__)

SQLITE_FILE = "optuna.db"
JOURNAL_FILE = "optuna.journal"
JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
LOCK_TIMEOUT_S = 60          # SQLite: concurrent readers (medalign status) wait instead of failing
CONNECT_TIMEOUT_S = 10       # a database server that does not answer fails the check, not the sweep
DRIVER_HINTS = {"postgresql": "pip install 'psycopg[binary]'   (or: pip install 'medalign-platform[postgres]')",
                "mysql": "pip install pymysql   (and write mysql+pymysql://...)"}


_DATABASES: dict[str, object] = {}  # opened RDBStorage of each database URL (not SQLite files)


@dataclass(frozen=True)
class StudyStorage:
    """A resolved ``sweep.storage``.

    Attributes:
        kind: ``sqlite`` / ``journal`` (a file in the experiment folder), ``journal_file`` (a
            journal file elsewhere) or ``rdb`` (a database URL).
        target: the file path (file kinds) or the URL (``rdb``).
    """

    kind: str
    target: str

    @property
    def is_file_in_experiment(self) -> bool:
        return self.kind in ("sqlite", "journal")

    @property
    def url(self) -> str:
        """What to show and what optuna-dashboard takes: an RDB URL or a journal file path."""
        return f"sqlite:///{self.target}" if self.kind == "sqlite" else self.target

    def open(self):
        """The Optuna storage object.

        Raises:
            ConfigError: a database driver is missing.
        """
        import optuna

        if self.kind in ("journal", "journal_file"):
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            # The open-lock works on filesystems without symlinks (NFS included).
            return optuna.storages.JournalStorage(JournalFileBackend(self.target, JournalFileOpenLock(self.target)))
        url = self.url
        if self.kind == "sqlite":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        if url.startswith("sqlite"):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": LOCK_TIMEOUT_S}})
        if url in _DATABASES:  # one engine (and connection pool) per database server and process
            return _DATABASES[url]
        args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
        try:
            _DATABASES[url] = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": args})
            return _DATABASES[url]
        except ModuleNotFoundError as error:
            scheme = url.split(":", 1)[0].split("+", 1)[0]
            raise ConfigError(f"sweep.storage={url}: the database driver {error.name!r} is not installed; "
                              f"{DRIVER_HINTS.get(scheme, 'install the SQLAlchemy driver of that database')}") \
                from error


def check_setting(value: str | None) -> None:
    """Checks ``sweep.storage`` without connecting: a known form, no password in a URL.

    Raises:
        ConfigError: naming the key, the problem and the fix.
    """
    if value in (None, "", "sqlite", "journal"):
        return
    text = str(value)
    if "://" not in text:
        if not text.endswith(JOURNAL_SUFFIXES):
            raise ConfigError(f"sweep.storage={text!r} is neither sqlite, journal, a journal file "
                              f"({'/'.join(JOURNAL_SUFFIXES)}) nor a database URL such as "
                              f"postgresql://user@host:5432/db")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as error:
        raise ConfigError(f"sweep.storage={text!r} is not a database URL ({error}); e.g. "
                          f"postgresql://user@host:5432/db") from error
    if url.password:
        raise ConfigError("sweep.storage must not contain a password (sweep.json records it): remove it from the "
                          "URL and put it in PGPASSWORD or ~/.pgpass (PostgreSQL), or the driver's option file")


def resolve_storage(value: str | None, study_dir: str | Path) -> StudyStorage:
    """``sweep.storage`` resolved against the local folder that holds file studies.

    Args:
        value: the setting (see the module doc).
        study_dir: the experiment folder, or its local mirror when the experiment is remote.
    """
    check_setting(value)
    folder = Path(study_dir)
    if value in (None, "", "sqlite"):
        return StudyStorage("sqlite", str(folder.resolve() / SQLITE_FILE))
    if value == "journal":
        return StudyStorage("journal", str(folder.resolve() / JOURNAL_FILE))
    if "://" not in str(value):
        return StudyStorage("journal_file", str(Path(str(value)).expanduser().resolve()))
    return StudyStorage("rdb", str(value))


def connect(storage: StudyStorage):
    """Opens the storage and touches it once, so a bad URL or a server that is down fails before Ray starts.

    Raises:
        ConfigError: naming ``sweep.storage``, the error and the fix.
    """
    try:
        opened = storage.open()  # RDBStorage connects (and creates its tables) here
        opened.get_all_studies()
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any driver error: the setting cannot be used
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"sweep.storage={storage.url}: cannot open the study storage ({first}); start the "
                          f"database or fix the URL (user, host, port, database name)") from error
    return opened


def study_file_name(storage: StudyStorage) -> str | None:
    """The file name of a study kept in the experiment folder (None for databases and outside files)."""
    if not storage.is_file_in_experiment:
        return None
    return SQLITE_FILE if storage.kind == "sqlite" else JOURNAL_FILE


class StudyUploader:
    """Copies a file study of a remote experiment into the experiment folder while the sweep runs.

    The driver writes the study into its own local folder; the copy in the experiment folder
    lets ``medalign status`` read it from anywhere and a resume on another machine continue
    it. A background thread copies it every ``period_s`` seconds when it changed; :meth:`stop`
    copies it a last time.

    Args:
        local: the study file the driver writes.
        remote: its place in the experiment folder (a :class:`~medalign_platform.run.filesystems.StoragePath`).
        period_s: seconds between checks.
    """

    def __init__(self, local: Path, remote, period_s: float = 5.0):
        self.local, self.remote, self.period_s = Path(local), remote, period_s
        self._sent: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def upload(self) -> bool:
        """Copies the study if it changed since the last copy; returns whether it copied."""
        try:
            stat = self.local.stat()
        except FileNotFoundError:
            return False
        if (stat.st_mtime, stat.st_size) == self._sent:
            return False
        self.remote.write_bytes(self.local.read_bytes())
        self._sent = (stat.st_mtime, stat.st_size)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.upload()
            except OSError as error:  # a storage hiccup: the next period tries again
                logger.warning("could not copy the study to %s: %s", self.remote, error)

    def start(self) -> "StudyUploader":
        self._thread = threading.Thread(target=self._loop, name="medalign-study-upload", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.upload()
