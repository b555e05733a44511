"""What migration 0020 (search the new text) costs on a filled table (issue 18).

Migration 0020 drops the generated `search` column and adds it again over
extracted_text: Postgres 16 rewrites the table (to_tsvector of every row) and
rebuilds the GIN index, holding an ACCESS EXCLUSIVE lock throughout. This fills a
table shaped like `messages` where it matters (subject, From, a 5 KB text body,
an 8 KB HTML body, a 1 KB extracted_text, the 0014 search column and its index)
with N rows, then runs the statements of 0020 (the table renamed) and prints the
seconds and the table's size before and after.

    .venv/bin/python -m bench.search_migration [rows]
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pgserver

MIGRATION = (Path(__file__).resolve().parents[1] / "smtpd_agent" / "store" / "migrations"
             / "0020_search_new_text.sql")
SEARCH_0014 = """search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english'::regconfig, left(coalesce(subject, ''), 1000)), 'A') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(from_header, ''), 1000)), 'B') ||
    setweight(to_tsvector('english'::regconfig, left(coalesce(text_body, ''), 100000)), 'C')
) STORED"""


async def main(url: str, rows: int) -> None:
    c = await asyncpg.connect(url)
    await c.execute("DROP TABLE IF EXISTS bench_messages")
    await c.execute(f"""CREATE TABLE bench_messages (
        id bigserial PRIMARY KEY, workspace_id bigint NOT NULL, subject text,
        from_header text, text_body text, html_body text, extracted_text text,
        {SEARCH_0014})""")
    await c.execute("CREATE INDEX bench_messages_search ON bench_messages USING gin (search)")
    random.seed(20)
    words = ["".join(random.choices(string.ascii_lowercase, k=random.randint(3, 9)))
             for _ in range(5000)]

    def text(size: int) -> str:
        return " ".join(random.choices(words, k=size // 5))[:size]

    batch = [(1, f"Re: subject {i} {text(40)}", "Alice <alice@example.org>", text(5000),
              f"<p>{text(8000)}</p>", text(1000)) for i in range(1000)]
    began = time.perf_counter()
    for _ in range(rows // len(batch)):
        await c.copy_records_to_table(
            "bench_messages", records=batch,
            columns=["workspace_id", "subject", "from_header", "text_body", "html_body",
                     "extracted_text"])
    filled = time.perf_counter() - began
    size = await c.fetchval("SELECT pg_size_pretty(pg_total_relation_size('bench_messages'))")
    count = await c.fetchval("SELECT count(*) FROM bench_messages")
    sql = MIGRATION.read_text().replace("messages_search", "bench_messages_search") \
        .replace("TABLE messages", "TABLE bench_messages") \
        .replace("ON messages", "ON bench_messages")
    began = time.perf_counter()
    async with c.transaction():
        await c.execute(sql)
    took = time.perf_counter() - began
    after = await c.fetchval("SELECT pg_size_pretty(pg_total_relation_size('bench_messages'))")
    print(f"rows={count} fill={filled:.1f}s size_before={size} migration_0020={took:.1f}s "
          f"({took / count * 1e6:.0f} µs/row) size_after={after}")
    await c.execute("DROP TABLE bench_messages")
    await c.close()


def run() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    server = pgserver.get_server(tempfile.mkdtemp(prefix="search-migration-"),
                                 cleanup_mode="stop")
    try:
        asyncio.run(main(server.get_uri(), rows))
    finally:
        server.cleanup()


if __name__ == "__main__":
    run()
