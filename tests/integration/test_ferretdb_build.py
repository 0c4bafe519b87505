"""The embedded FerretDB as tools/install-ferretdb.sh builds it: the patch in tools/ferretdb/.

A lookup by `_id` reads one row through the `_id` index instead of every row of the table. What
SQLite does is read from FerretDB's `explain` (SQLite's EXPLAIN QUERY PLAN), and the answers are
checked too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.collection import Collection

from tests.integration.stores import ferretdb

ROWS = 200


@pytest.fixture(scope="module")
def things(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection[dict[str, Any]]]:
    with ferretdb(tmp_path_factory.mktemp("ferretdb-build")) as uri:
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        try:
            collection = client["build"]["things"]
            collection.insert_many([{"_id": f"k{i:04d}", "revision": 1, "kind": i % 2} for i in range(ROWS)])
            yield collection
        finally:
            client.close()


def _plan(collection: Collection[dict[str, Any]], query: dict[str, Any]) -> str:
    explained = collection.database.command("explain", {"find": collection.name, "filter": query})
    return " ".join(explained["queryPlanner"]["Plan"])


def test_a_lookup_by_id_alone_uses_the_id_index(things: Collection[dict[str, Any]]) -> None:
    # sqlite-id-index.patch: the query's `_id` expression is the index's.
    assert "USING INDEX" in _plan(things, {"_id": "k0150"}), _plan(things, {"_id": "k0150"})
    assert things.find_one({"_id": "k0150"}) == {"_id": "k0150", "revision": 1, "kind": 0}


def test_other_filters_are_answered_by_reading_the_table(things: Collection[dict[str, Any]]) -> None:
    # Only a filter of `_id` alone is narrowed to one row (see tools/ferretdb/README.md).
    assert "USING INDEX" not in _plan(things, {"_id": "k0151", "revision": {"$lt": 2}})
    query = {"$or": [{"_id": "k0003"}, {"_id": "k0004"}]}
    assert "USING INDEX" not in _plan(things, query)
    assert sorted(d["_id"] for d in things.find(query)) == ["k0003", "k0004"]
    assert things.count_documents({"kind": 1}) == ROWS // 2


def test_a_conditional_replace_by_id_is_a_forward_only_write(things: Collection[dict[str, Any]]) -> None:
    things.insert_one({"_id": "guarded", "revision": 3})
    assert things.replace_one({"_id": "guarded", "revision": {"$lt": 4}}, {"revision": 4}).modified_count == 1
    # An older revision arriving late changes nothing.
    assert things.replace_one({"_id": "guarded", "revision": {"$lt": 2}}, {"revision": 2}).matched_count == 0
    assert things.find_one({"_id": "guarded"}) == {"_id": "guarded", "revision": 4}
    assert things.delete_one({"_id": "guarded", "revision": 3}).deleted_count == 0
    assert things.delete_one({"_id": "guarded", "revision": 4}).deleted_count == 1
