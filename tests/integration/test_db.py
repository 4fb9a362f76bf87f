"""Opening the database file: every bad path gets a clear error and nothing stored is touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap

import jobfuncs
import pytest

from litemultistep import Database, DatabaseUnusable, MultiStepTask, SchemaTooNew
from litemultistep.db import SCHEMA_VERSION


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class TestBadPaths:
    def test_directory(self, tmp_path):
        with pytest.raises(DatabaseUnusable, match="is a directory"):
            Database(tmp_path)

    def test_missing_parent_directory(self, tmp_path):
        with pytest.raises(DatabaseUnusable, match="does not exist; create it first"):
            Database(tmp_path / "nope" / "app.sqlite")

    def test_not_sqlite(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("just some text, not a database\n" * 10)
        before = digest(path)
        with pytest.raises(DatabaseUnusable, match="is not a SQLite database"):
            MultiStepTask.create("x", db=str(path))
        assert digest(path) == before

    def test_truncated_sqlite_file(self, tmp_path, db):
        MultiStepTask.create("x", db=db)
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        with open(db, "rb") as f:
            data = f.read()
        broken = tmp_path / "broken.sqlite"
        broken.write_bytes(data[:5000])
        with pytest.raises(DatabaseUnusable, match="not a usable SQLite database|disk image is malformed"):
            Database(broken)

    def test_corrupt_sqlite_file(self, tmp_path):
        path = tmp_path / "corrupt.sqlite"
        path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
        with pytest.raises(DatabaseUnusable):
            Database(path)

    def test_another_programs_database_is_left_untouched(self, tmp_path):
        path = tmp_path / "other.sqlite"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
        conn.commit()
        conn.close()
        before = digest(path)
        with pytest.raises(DatabaseUnusable, match="another program"):
            Database(path)
        assert digest(path) == before
        assert not os.path.exists(str(path) + "-wal")

    def test_newer_schema_is_refused_and_kept(self, db):
        task = MultiStepTask.create("keep", db=db)
        task.add_job(jobfuncs.noop, 1)
        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        with pytest.raises(SchemaTooNew, match="newer litemultistep .* upgrade litemultistep"):
            Database(db)
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT normal_count FROM task").fetchone() == (1,)
        conn.close()

    @pytest.mark.parametrize("uri", ["file:app.sqlite?mode=ro", ":memory:", ""])
    def test_uri_or_memory(self, uri):
        with pytest.raises(DatabaseUnusable, match="not a file path"):
            Database(uri)

    def test_read_only_file(self, tmp_path_factory):
        # root may write to any file, so as root the check runs in a child that drops to nobody
        folder = tempfile.mkdtemp(prefix="lms-ro-")
        os.chmod(folder, 0o777)
        path = os.path.join(folder, "ro.sqlite")
        MultiStepTask.create("x", db=path)
        os.chmod(path, 0o444)
        code = textwrap.dedent(f"""
            import os
            from litemultistep import Database, DatabaseUnusable  # imported while the stdlib is readable
            import litemultistep.sqlite
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                Database({path!r})
            except DatabaseUnusable as e:
                print("ERROR:", e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert f"ERROR: {path} is read-only" in out.stdout, out.stderr
        shutil.rmtree(folder)

    def test_network_filesystem_warns(self, tmp_path, monkeypatch):
        from litemultistep import NetworkFilesystemWarning
        from litemultistep import sqlite as dbmod
        mounts = tmp_path / "mounts"
        mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
        assert dbmod.filesystem_type(str(tmp_path / "x"), str(mounts)) == "nfs4"
        assert dbmod.filesystem_type("/var", str(mounts)) == "ext4"
        real = dbmod.filesystem_type
        monkeypatch.setattr(dbmod, "filesystem_type", lambda path: real(path, str(mounts)))
        with pytest.warns(NetworkFilesystemWarning, match="network filesystem \\(nfs4\\)"):
            Database(tmp_path / "app.sqlite")

    def test_reading_never_creates(self, tmp_path):
        with pytest.raises(DatabaseUnusable, match="never creates one"):
            Database(tmp_path / "absent.sqlite", create=False)
        assert not (tmp_path / "absent.sqlite").exists()


class TestFile:
    def test_wal_mode_and_schema_version(self, db):
        Database(db)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        conn.close()

    def test_owner_only_permissions_even_under_umask_000(self, tmp_path):
        path = str(tmp_path / "private.sqlite")
        old = os.umask(0)
        try:
            task = MultiStepTask.create("private", db=path)
            task.add_job(jobfuncs.noop)
            for f in (path, path + "-wal", path + "-shm", path + ".lock"):
                if os.path.exists(f):
                    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        finally:
            os.umask(old)

    def test_eight_processes_open_one_new_file_at_once(self, tmp_path):
        path = str(tmp_path / "race.sqlite")
        code = textwrap.dedent(f"""
            import sys, time
            from litemultistep import MultiStepTask
            start = float(sys.argv[1])
            while time.time() < start:
                pass
            t = MultiStepTask.create("race", db={path!r})
            print(t.task_id)
        """)
        start = f"{__import__('time').time() + 1.5}"
        procs = [subprocess.Popen([sys.executable, "-c", code, start], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        ids = {o[0].strip() for o in outs}
        assert len(ids) == 8
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT count(*) FROM task").fetchone() == (8,)
        conn.close()

    def test_older_schema_is_upgraded_under_the_lock(self, db, monkeypatch):
        from litemultistep import sqlite as dbmod
        task = MultiStepTask.create("old", db=db)
        monkeypatch.setattr(dbmod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        monkeypatch.setitem(dbmod.MIGRATIONS, SCHEMA_VERSION + 1, ["CREATE TABLE upgraded (x)"])
        Database(db)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert conn.execute("SELECT count(*) FROM upgraded").fetchone() == (0,)
        assert conn.execute("SELECT task_id FROM task").fetchone() == (task.task_id,)
        conn.close()

    def test_a_file_of_every_earlier_version_is_upgraded_and_keeps_its_tasks(self, tmp_path):
        from litemultistep.sqlite import MIGRATIONS
        for old in range(2, SCHEMA_VERSION):
            path = str(tmp_path / f"v{old}.sqlite")
            with MultiStepTask.create("old", db=Database(path)) as task:
                task.add_job(jobfuncs.noop)
            conn = sqlite3.connect(path)
            for version in range(SCHEMA_VERSION, old, -1):  # each migration undone, newest first
                for sql in reversed(MIGRATIONS[version]):
                    words = sql.split()
                    if words[:2] == ["CREATE", "INDEX"]:
                        conn.execute(f"DROP INDEX {words[2]}")
                    elif words[:2] == ["CREATE", "TABLE"]:
                        conn.execute(f"DROP TABLE {words[2]}")
                    elif words[0] == "ALTER":
                        conn.execute(f"ALTER TABLE {words[2]} DROP COLUMN {words[5]}")
                    # (an UPDATE fills a new column: nothing to undo)
            conn.execute(f"PRAGMA user_version = {old}")
            conn.commit()
            conn.close()
            upgraded = Database(path)
            assert upgraded.schema_version() == SCHEMA_VERSION
            assert upgraded.connection().execute("SELECT task_id FROM task").fetchone() == (task.task_id,)
            assert task.progress().pending_count == 1
            upgraded.close()

    def test_fork_child_reopens(self, db, log_path):
        task = MultiStepTask.create("fork", db=db)
        task.add_job(jobfuncs.noop, 0)  # the parent's connection is open now
        pid = os.fork()
        if pid == 0:  # child: must not reuse the parent's connection
            code = 1
            try:
                for i in range(50):
                    MultiStepTask.find(task.task_id, db=db).add_job(jobfuncs.noop, i)
                code = 0
            finally:
                os._exit(code)
        for i in range(50):
            task.add_job(jobfuncs.noop, i)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert task.normal_job_count == 101
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
