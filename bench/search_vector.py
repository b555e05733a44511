"""What the search column of migration 0012 costs per stored message (issue 18).

The same 2,000 rows (5 KB text bodies of random words, a subject, a From) are
inserted one statement each, in alternating rounds, into three tables on one
embedded Postgres: without a search column, with the generated tsvector only,
and with it and its GIN index (as `messages` has). Prints µs per insert per round.

    .venv/bin/python -m bench.search_vector
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
import tempfile
import time

import asyncpg
import pgserver

async def main(url):
    c = await asyncpg.connect(url)
    await c.execute("DROP TABLE IF EXISTS b_plain, b_search, b_vec")
    await c.execute("CREATE TABLE b_plain (id bigserial, subject text, from_header text, text_body text)")
    await c.execute("""CREATE TABLE b_search (id bigserial, subject text, from_header text, text_body text,
        search tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, left(coalesce(subject, ''), 1000)), 'A') ||
        setweight(to_tsvector('english'::regconfig, left(coalesce(from_header, ''), 1000)), 'B') ||
        setweight(to_tsvector('english'::regconfig, left(coalesce(text_body, ''), 100000)), 'C')) STORED)""")
    await c.execute("CREATE INDEX ON b_search USING gin (search)")
    await c.execute("CREATE TABLE b_vec (id bigserial, subject text, from_header text, text_body text, search tsvector GENERATED ALWAYS AS (setweight(to_tsvector('english'::regconfig, left(coalesce(subject, ''), 1000)), 'A') || setweight(to_tsvector('english'::regconfig, left(coalesce(from_header, ''), 1000)), 'B') || setweight(to_tsvector('english'::regconfig, left(coalesce(text_body, ''), 100000)), 'C')) STORED)")
    words = ["".join(random.choices(string.ascii_lowercase, k=random.randint(3, 9))) for _ in range(3000)]
    def body(): return " ".join(random.choices(words, k=800))[:5000]
    rows = [(f"subject {i} " + " ".join(random.choices(words, k=5)), "Alice <alice@example.org>", body()) for i in range(2000)]
    res = {"b_plain": [], "b_vec": [], "b_search": []}
    for rnd in range(3):
        for table in ("b_plain", "b_vec", "b_search"):
            t = time.perf_counter()
            for r in rows:
                await c.execute(f"INSERT INTO {table} (subject, from_header, text_body) VALUES ($1,$2,$3)", *r)
            res[table].append((time.perf_counter() - t) / len(rows) * 1e6)
    for k, v in res.items():
        print(k, "µs/insert per round:", [round(x) for x in v])
    await c.execute("DROP TABLE b_plain, b_search, b_vec")
    await c.close()

def run() -> None:
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
        return
    server = pgserver.get_server(tempfile.mkdtemp(prefix="search-bench-"), cleanup_mode="stop")
    try:
        asyncio.run(main(server.get_uri()))
    finally:
        server.cleanup()


if __name__ == "__main__":
    run()
