"""Per-user profiles: the one ACID store of an SNS service.

Everything else in SNS is soft state that can be rebuilt; the users'
customization settings are not, so they live in a transactional database
(TranSend kept them in a Berkeley DB behind the front ends).  Front ends read
a profile per request and pass its parameters to the workers.

* :class:`ProfileStore` is the small interface the front ends use, so a
  PostgreSQL store can replace SQLite without touching them.
* :class:`SQLiteProfileStore` is the default: one SQLite file in WAL mode
  (readers do not block the writer), every write in a ``BEGIN IMMEDIATE``
  transaction so read-modify-write is atomic across threads *and* processes,
  profiles as a JSON column, and a ``schema_version`` table checked on open.
* :data:`FIELDS` describes the known keys (the image-distillation settings
  of the TranSend example), each with its default and its check.  Unknown
  keys are allowed (other services keep their own settings) if their names
  are identifiers and their values JSON scalars.

Reading a user that was never stored gives the defaults.  The store is
synchronous and small: an asyncio front end calls it through
``asyncio.to_thread``; one store may be shared by threads (a lock serializes
its one connection).

Tested in tests/frontends/test_profiles.py.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

from core.errors import BusError

__all__ = [
    "SCHEMA_VERSION",
    "FORMATS",
    "Field",
    "FIELDS",
    "DEFAULTS",
    "ProfileError",
    "InvalidProfile",
    "validate",
    "ProfileStore",
    "SQLiteProfileStore",
]

SCHEMA_VERSION = 1
FORMATS = ("jpeg", "png", "webp", "same")
MAX_USER_LEN = 256
MAX_SETTINGS = 64
_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


class ProfileError(BusError):
    """The profile database cannot be used as asked (e.g. a newer schema)."""


class InvalidProfile(ProfileError, ValueError):
    """A user name or a profile setting that fails validation; names the key and the rule."""


@dataclass(frozen=True)
class Field:
    """A known profile key: its default and a check returning an error text or None."""

    default: Any
    check: Callable[[Any], str | None]
    doc: str = ""


def _int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(value):
        # bool is an int subclass; True is not a width.
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"must be an integer from {lo} to {hi}"
        return None

    return check


def _one_of(choices: tuple) -> Callable[[Any], str | None]:
    def check(value):
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


FIELDS: Mapping[str, Field] = {
    "max_width": Field(800, _int_in(1, 16384), "largest width of a distilled image, pixels"),
    "max_height": Field(600, _int_in(1, 16384), "largest height of a distilled image, pixels"),
    "quality": Field(60, _int_in(1, 100), "lossy encoder quality (JPEG, WebP)"),
    "format": Field("jpeg", _one_of(FORMATS), "output format; 'same' keeps the original's"),
}
DEFAULTS: Mapping[str, Any] = {k: f.default for k, f in FIELDS.items()}


def _check_user(user) -> str:
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_LEN:
        raise InvalidProfile(f"user must be a non-empty string of at most {MAX_USER_LEN} characters, got {user!r}")
    return user


def validate(changes: Mapping[str, Any]) -> dict:
    """Check settings; returns them as a plain dict or raises :class:`InvalidProfile`.

    Known keys (:data:`FIELDS`) must pass their check.  Other keys must be
    lowercase identifiers with a JSON scalar value (str, int, finite float,
    bool).  ``None`` as a value means "back to the default" and is kept here
    for the store to apply.
    """
    out = {}
    for key, value in changes.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise InvalidProfile(f"profile key {key!r} must be a lowercase identifier (a-z, 0-9, _)")
        if value is None:
            out[key] = None
            continue
        field = FIELDS.get(key)
        if field is not None:
            problem = field.check(value)
            if problem:
                raise InvalidProfile(f"profile setting {key}={value!r} {problem}")
        elif not isinstance(value, (str, int, float, bool)) or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidProfile(f"profile setting {key}={value!r} must be a string, number or boolean")
        out[key] = value
    return out


@runtime_checkable
class ProfileStore(Protocol):
    """What a front end needs from a profile database.

    ``get`` returns the defaults overlaid with the user's stored settings
    (defaults only for an unknown user); ``put`` replaces the stored settings;
    ``update`` changes some keys in one transaction (``None`` resets a key)
    and returns the new profile; ``modify`` applies a function to the stored
    settings in one transaction; ``delete`` forgets the user.
    """

    def get(self, user: str) -> dict: ...

    def put(self, user: str, profile: Mapping[str, Any]) -> None: ...

    def update(self, user: str, /, **changes: Any) -> dict: ...

    def modify(self, user: str, fn: Callable[[dict], Mapping[str, Any]]) -> dict: ...

    def delete(self, user: str) -> bool: ...

    def close(self) -> None: ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS profiles ("
    " user TEXT PRIMARY KEY,"
    " settings TEXT NOT NULL CHECK (json_valid(settings) AND json_type(settings) = 'object'),"
    " revision INTEGER NOT NULL DEFAULT 1)",
)


class SQLiteProfileStore:
    """:class:`ProfileStore` on one SQLite file, safe for several processes at once.

    ``path`` is created if missing (with its schema).  ``timeout`` is how long
    a writer waits for another process's transaction before failing with
    :class:`ProfileError`.  Use as a context manager or call :meth:`close`.
    Open one store per process (a connection must not cross a fork).
    """

    def __init__(self, path: str | Path, *, timeout: float = 10.0):
        self._path = str(path)
        try:
            # isolation_level=None: we issue BEGIN ourselves, so every
            # transaction is explicit and takes the write lock up front.
            self._db = sqlite3.connect(self._path, timeout=timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise ProfileError(f"cannot open the profile database {self._path}: {e}") from e
        self._lock = threading.Lock()
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ProfileError(f"the profile database {self._path} cannot use WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        # executescript() would commit our transaction first: one execute()
        # per statement keeps creation and the version check in one transaction,
        # so two processes opening a new file at once cannot both initialize it.
        with self._write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise ProfileError(
                    f"the profile database {self._path} has schema version {row[0]}, newer than this "
                    f"snsbus understands ({SCHEMA_VERSION}); upgrade snsbus or use another file"
                )

    # -- transactions --------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; commits on success, rolls back on any exception.

        BEGIN IMMEDIATE takes SQLite's write lock before the first read, so two
        processes doing read-modify-write cannot interleave (no lost update);
        the thread lock does the same for threads sharing this connection.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise ProfileError(f"profile database {self._path} is busy or unusable: {e}") from e
            try:
                yield self._db
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise ProfileError(f"profile database {self._path}: {exc}") from exc
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise ProfileError(f"profile database {self._path}: commit failed: {e}") from e

    def _read_one(self, sql: str, params: tuple):
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchone()
            except sqlite3.Error as e:
                raise ProfileError(f"cannot read the profile database {self._path}: {e}") from e

    def _stored(self, db, user: str) -> dict:
        row = db.execute("SELECT settings FROM profiles WHERE user = ?", (user,)).fetchone()
        return json.loads(row[0]) if row else {}

    def _save(self, db, user: str, settings: dict) -> None:
        if len(settings) > MAX_SETTINGS:
            raise InvalidProfile(f"a profile holds at most {MAX_SETTINGS} settings, got {len(settings)}")
        db.execute(
            "INSERT INTO profiles (user, settings) VALUES (?, ?) "
            "ON CONFLICT (user) DO UPDATE SET settings = excluded.settings, revision = revision + 1",
            (user, json.dumps(settings, sort_keys=True)),
        )

    # -- the ProfileStore interface ------------------------------------------

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    def get(self, user: str) -> dict:
        """The user's profile: :data:`DEFAULTS` overlaid with what is stored."""
        return {**DEFAULTS, **self.stored(user)}

    def stored(self, user: str) -> dict:
        """Only the settings stored for the user (no defaults); {} for an unknown user."""
        row = self._read_one("SELECT settings FROM profiles WHERE user = ?", (_check_user(user),))
        return json.loads(row[0]) if row else {}

    def revision(self, user: str) -> int:
        """How many times the user's profile was written (0: never), for cache validation."""
        row = self._read_one("SELECT revision FROM profiles WHERE user = ?", (_check_user(user),))
        return row[0] if row else 0

    def put(self, user: str, profile: Mapping[str, Any]) -> None:
        """Replace the user's stored settings with ``profile`` (validated; None values dropped)."""
        user = _check_user(user)
        settings = {k: v for k, v in validate(profile).items() if v is not None}
        with self._write() as db:
            self._save(db, user, settings)

    def update(self, user: str, /, **changes: Any) -> dict:
        """Change some settings atomically (``key=None`` resets one); returns the new profile."""
        user = _check_user(user)
        changes = validate(changes)
        with self._write() as db:
            settings = self._stored(db, user)
            for key, value in changes.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value
            self._save(db, user, settings)
        return {**DEFAULTS, **settings}

    def modify(self, user: str, fn: Callable[[dict], Mapping[str, Any]]) -> dict:
        """Replace the stored settings with ``fn(stored)`` in one transaction.

        ``fn`` gets a copy of the stored settings (no defaults) and returns the
        new ones, which are validated; it runs while the write lock is held,
        so keep it short and free of I/O.  Returns the new profile.
        """
        user = _check_user(user)
        with self._write() as db:
            settings = {k: v for k, v in validate(fn(self._stored(db, user))).items() if v is not None}
            self._save(db, user, settings)
        return {**DEFAULTS, **settings}

    def delete(self, user: str) -> bool:
        """Forget the user; False if nothing was stored."""
        user = _check_user(user)
        with self._write() as db:
            return db.execute("DELETE FROM profiles WHERE user = ?", (user,)).rowcount > 0

    def users(self) -> list[str]:
        """Every user with stored settings, sorted."""
        with self._lock:
            try:
                return [r[0] for r in self._db.execute("SELECT user FROM profiles ORDER BY user")]
            except sqlite3.Error as e:
                raise ProfileError(f"cannot read the profile database {self._path}: {e}") from e

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return self._read_one("SELECT max(version) FROM schema_version", ())[0]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteProfileStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
