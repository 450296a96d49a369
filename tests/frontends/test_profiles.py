"""The per-user profile store on a real SQLite file, including two writer processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from core.errors import BusError
from frontends.profiles import (
    DEFAULTS,
    FIELDS,
    SCHEMA_VERSION,
    InvalidProfile,
    ProfileError,
    ProfileStore,
    SQLiteProfileStore,
    validate,
)


@pytest.fixture
def store(tmp_path):
    s = SQLiteProfileStore(tmp_path / "profiles.db")
    try:
        yield s
    finally:
        s.close()


def test_unknown_user_gets_defaults_and_nothing_is_stored(store):
    assert store.get("alice") == dict(DEFAULTS)
    assert store.stored("alice") == {} and store.users() == [] and store.revision("alice") == 0
    assert set(DEFAULTS) == set(FIELDS) == {"max_width", "max_height", "quality", "format"}


def test_it_is_a_profile_store(store):
    assert isinstance(store, ProfileStore)


def test_put_replaces_and_get_overlays_defaults(store):
    store.put("alice", {"quality": 30, "format": "webp"})
    assert store.get("alice") == {**DEFAULTS, "quality": 30, "format": "webp"}
    store.put("alice", {"max_width": 320})
    assert store.stored("alice") == {"max_width": 320}
    assert store.revision("alice") == 2 and store.users() == ["alice"]


def test_update_changes_some_keys_and_none_resets(store):
    assert store.update("bob", quality=20)["quality"] == 20
    new = store.update("bob", max_height=100, quality=None)
    assert new == {**DEFAULTS, "max_height": 100}
    assert store.stored("bob") == {"max_height": 100}


def test_custom_keys_are_allowed_with_scalar_values(store):
    store.update("carol", lang="fr", grayscale=True, ratio=0.5)
    assert store.get("carol")["lang"] == "fr" and store.get("carol")["grayscale"] is True


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "1 to 100"),
        ({"quality": True}, "integer"),
        ({"quality": "50"}, "integer"),
        ({"max_width": 0}, "max_width"),
        ({"max_height": 1.5}, "max_height"),
        ({"format": "gif"}, "jpeg, png, webp"),
        ({"Bad-Key": 1}, "identifier"),
        ({"nested": {"a": 1}}, "string, number or boolean"),
        ({"ratio": float("nan")}, "string, number or boolean"),
    ],
)
def test_validation_names_the_key_and_rule(store, changes, match):
    with pytest.raises(InvalidProfile, match=match) as exc:
        store.update("dave", **changes)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, BusError)
    assert store.stored("dave") == {}  # rolled back, nothing written
    with pytest.raises(InvalidProfile):
        store.put("dave", changes)


@pytest.mark.parametrize("user", ["", "x" * 257, None, 5])
def test_bad_user_names(store, user):
    with pytest.raises(InvalidProfile, match="user"):
        store.get(user)


def test_validate_keeps_none_for_reset():
    assert validate({"quality": None, "format": "png"}) == {"quality": None, "format": "png"}


def test_too_many_settings_refused(store):
    with pytest.raises(InvalidProfile, match="at most"):
        store.put("eve", {f"k{i}": i for i in range(65)})


def test_delete(store):
    store.update("frank", quality=10)
    assert store.delete("frank") and not store.delete("frank")
    assert store.get("frank") == dict(DEFAULTS)


def test_modify_is_a_transaction(store):
    store.modify("gina", lambda s: {**s, "hits": s.get("hits", 0) + 1})
    assert store.modify("gina", lambda s: {**s, "hits": s["hits"] + 1})["hits"] == 2

    def boom(settings):
        raise RuntimeError("worker died mid-update")

    with pytest.raises(RuntimeError):
        store.modify("gina", boom)
    assert store.stored("gina") == {"hits": 2}
    # The store is still usable after the rollback.
    assert store.update("gina", quality=5)["quality"] == 5


def test_file_is_wal_with_a_schema_version_and_survives_reopen(tmp_path):
    path = tmp_path / "p.db"
    with SQLiteProfileStore(path) as s:
        s.update("alice", quality=42)
        assert s.schema_version() == SCHEMA_VERSION and s.path == str(path)
    with SQLiteProfileStore(path) as s:
        assert s.get("alice")["quality"] == 42
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        db.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "p.db"
    SQLiteProfileStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(ProfileError, match="newer than this snsbus"):
        SQLiteProfileStore(path)


def test_unusable_path_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot open"):
        SQLiteProfileStore(tmp_path / "missing-dir" / "p.db")


def test_threads_sharing_one_store_lose_no_update(store):
    def work():
        for _ in range(100):
            store.modify("t", lambda s: {**s, "n": s.get("n", 0) + 1})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert store.stored("t")["n"] == 400


N_EACH = 150


def _writer(path: str, tag: str, ready, start, done) -> None:
    # Runs in a child process: its own connection to the same file.  Both
    # children are ready before either writes, so their writes interleave.
    with SQLiteProfileStore(path) as s:
        ready.put(tag)
        start.wait(60)
        for i in range(N_EACH):
            s.modify("shared", lambda st: {**st, "count": st.get("count", 0) + 1})
            s.update("shared", **{f"last_{tag}": i})
    done.put(tag)


def test_two_processes_updating_concurrently_lose_no_update(tmp_path):
    path = str(tmp_path / "shared.db")
    ctx = multiprocessing.get_context("spawn")
    ready, start, done = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, tag, ready, start, done)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    try:
        assert sorted(ready.get(timeout=60) for _ in procs) == ["a", "b"]
        start.set()
        finished = sorted(done.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert finished == ["a", "b"]
    assert [p.exitcode for p in procs] == [0, 0]
    with SQLiteProfileStore(path) as s:
        got = s.stored("shared")
        assert got == {"count": 2 * N_EACH, "last_a": N_EACH - 1, "last_b": N_EACH - 1}
        assert s.revision("shared") == 4 * N_EACH
