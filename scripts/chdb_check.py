#!/usr/bin/env python3
"""Run SQL statements against a current ClickHouse engine (chdb, in-process).

Usage: python3 scripts/chdb_check.py STATEMENTS.json

STATEMENTS.json:
    {"database": "name",
     "config": "<clickhouse>...</clickhouse>",   (optional)
     "statements": [{"name": "create votes", "sql": "CREATE TABLE ..."}, ...]}

"config", when given, is a server configuration file's text the session starts
with (e.g. a cluster in remote_servers, macros, an in-memory Keeper), so DDL
that names them can be checked.

A chdb session is opened in a temporary directory, the database is created and
made current with USE, and the statements run in order. Every failing statement
is reported with the engine's error (later statements still run), and the exit
status is 1; otherwise it prints "N statements ok on ClickHouse <version>".
The tests run the same SQL against the packaged clickhouse-server, so this
catches syntax or semantics that only a current ClickHouse rejects.
"""

import json
import os
import shutil
import sys
import tempfile


def load(path):
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    database = spec.get("database")
    statements = spec.get("statements")
    if not isinstance(database, str) or not database:
        raise ValueError('"database" must be a non-empty string')
    if not isinstance(statements, list):
        raise ValueError('"statements" must be a list')
    for i, stmt in enumerate(statements):
        if not (isinstance(stmt, dict) and isinstance(stmt.get("sql"), str)):
            raise ValueError(f'statement #{i + 1} needs a "sql" string')
    config = spec.get("config")
    if config is not None and not isinstance(config, str):
        raise ValueError('"config" must be a string')
    return database, statements, config


def quote_ident(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def main(argv):
    if len(argv) != 2:
        print(f"usage: python3 {argv[0]} STATEMENTS.json", file=sys.stderr)
        return 2
    try:
        database, statements, config = load(argv[1])
    except (OSError, ValueError) as e:
        print(f"error: {argv[1]}: {e}", file=sys.stderr)
        return 2

    try:
        from chdb import session
    except ImportError as e:
        print(f"error: chdb is not installed (python3 -m pip install chdb): {e}",
              file=sys.stderr)
        return 2

    path = tempfile.mkdtemp(prefix="chdb-check-")
    if config is None:
        s = session.Session(path)
    else:
        config_file = f"{path}/config.xml"
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(config)
        s = session.Session(f"file:{path}/data?config-file={config_file}")
    failures = []
    version = "?"
    try:
        version = str(s.query("SELECT version()", "TSVRaw")).strip()
        s.query(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
        s.query(f"USE {quote_ident(database)}")
        for i, stmt in enumerate(statements):
            name = stmt.get("name") or f"#{i + 1}"
            try:
                s.query(stmt["sql"])
            except Exception as e:  # chdb raises its own error types
                failures.append((name, str(e).strip()))
    finally:
        # A session with replicated tables on the in-memory Keeper never finishes
        # closing: leave it to the process's end (below) instead.
        if config is None:
            s.close()

    if failures:
        print(f"{len(failures)} of {len(statements)} statements failed on "
              f"ClickHouse {version}:", file=sys.stderr)
        for name, error in failures:
            print(f"- {name}: {error}", file=sys.stderr)
        status = 1
    else:
        print(f"{len(statements)} statements ok on ClickHouse {version}")
        status = 0
    sys.stdout.flush()
    sys.stderr.flush()
    shutil.rmtree(path, ignore_errors=True)
    if config is not None:
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
