"""The two schemas, SQLite's (created from the peewee models in sqlite.py) and PostgreSQL's (pg.SCHEMA),
describe the same tables, column by column, and the same indexes: one test keeps the two sources
from drifting apart."""

from __future__ import annotations

import pytest

from litemultistep.db import SCHEMA_VERSION, TABLES, open_database

#: the PostgreSQL types a SQLite column type stands for (ids and counters are 64-bit there)
TYPES = {"INTEGER": {"integer", "bigint"}, "REAL": {"double precision"}, "TEXT": {"text"}}


def sqlite_columns(db) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    conn = db.connection()
    return {t: [(name, kind, bool(notnull), default) for _, name, kind, notnull, default, _ in
                conn.execute(f"PRAGMA table_info({t})").fetchall()] for t in TABLES}


def postgres_columns(db) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    conn = db.connection()
    out = {}
    for t in TABLES:
        rows = conn.execute("SELECT column_name, data_type, is_nullable, column_default "
                            "FROM information_schema.columns WHERE table_schema = current_schema() "
                            "AND table_name = ? ORDER BY ordinal_position",
                            (t,)).fetchall()
        out[t] = [(name, kind, nullable == "NO", None if default and default.startswith("nextval(") else default)
                  for name, kind, nullable, default in rows]
    return out


def test_both_schemas_have_the_same_columns_in_the_same_order(db, pg_db):
    lite, pg = sqlite_columns(open_database(db)), postgres_columns(open_database(pg_db))
    for table in TABLES:
        assert [c[0] for c in lite[table]] == [c[0] for c in pg[table]], f"columns of {table} differ"
        for (name, lite_type, lite_notnull, lite_default), (_, pg_type, pg_notnull, pg_default) in zip(
                lite[table], pg[table], strict=True):
            where = f"{table}.{name}"
            assert pg_type in TYPES[lite_type], f"{where}: {lite_type} on SQLite, {pg_type} on PostgreSQL"
            assert lite_notnull == pg_notnull, f"{where}: NOT NULL on one backend only"
            assert lite_default == pg_default, f"{where}: default {lite_default!r} against {pg_default!r}"


def test_both_schemas_have_the_same_indexes(db, pg_db):
    lite = {name for (name,) in open_database(db).connection().execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'").fetchall()}
    pg = {name for (name,) in open_database(pg_db).connection().execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()").fetchall()}
    # the unique key of a task's id is named by each database its own way; primary keys are implicit
    lite -= {"task_task_id"}
    pg -= {"task_task_id_key", *(f"{t}_pkey" for t in TABLES), "litemultistep_schema_pkey"}
    assert lite == pg


def test_both_schemas_are_at_the_version_this_litemultistep_writes(db, pg_db):
    assert open_database(db).schema_version() == open_database(pg_db).schema_version() == SCHEMA_VERSION


@pytest.mark.parametrize("table", TABLES)
def test_every_table_exists_empty_on_both(any_db, table):
    assert open_database(any_db).connection().execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
