"""The libnftables binding against the real kernel: transactions, listings, errors."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from fastcompute.network import Nft, NftError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="nftables needs root")


@pytest.fixture
def table() -> Iterator[str]:
    name = "fctn" + uuid.uuid4().hex[:6]
    yield name
    with Nft() as nft:
        for family in ("inet", "bridge"):
            with contextlib.suppress(NftError):
                nft.run(f"delete table {family} {name}")


def _add(table: str, *more: dict) -> dict:  # type: ignore[type-arg]
    return {
        "nftables": [
            {"add": {"table": {"family": "inet", "name": table}}},
            {"add": {"set": {"family": "inet", "table": table, "name": "s", "type": "ipv4_addr"}}},
            *more,
        ]
    }


def test_a_json_transaction_is_listed_back(table: str) -> None:
    with Nft() as nft:
        assert nft.json(_add(table)) == {}
        nft.json({"nftables": [{"add": {"element": {"family": "inet", "table": table, "name": "s",
                                                    "elem": ["10.1.2.3", "10.1.2.4"]}}}]})  # fmt: skip
        listing = nft.json({"nftables": [{"list": {"set": {"family": "inet", "table": table, "name": "s"}}}]})
    sets = [o["set"] for o in listing["nftables"] if "set" in o]
    assert sets[0]["name"] == "s"
    assert sorted(sets[0]["elem"]) == ["10.1.2.3", "10.1.2.4"]


def test_a_failing_transaction_changes_nothing_and_raises_nfts_text(table: str) -> None:
    with Nft() as nft:
        bad = _add(
            table, {"add": {"element": {"family": "inet", "table": table, "name": "missing", "elem": ["10.0.0.1"]}}}
        )
        with pytest.raises(NftError) as err:
            nft.json(bad)
        assert "No such file or directory" in err.value.message
        assert err.value.code == "INTERNAL"
        with pytest.raises(NftError):
            nft.json({"nftables": [{"list": {"table": {"family": "inet", "name": table}}}]})


def test_nft_syntax_runs_too(table: str) -> None:
    with Nft() as nft:
        nft.run(f"add table inet {table}\nadd chain inet {table} c\nadd rule inet {table} c tcp dport 22 accept")
        out = nft.json({"nftables": [{"list": {"chain": {"family": "inet", "table": table, "name": "c"}}}]})
    rules = [o["rule"] for o in out["nftables"] if "rule" in o]
    assert len(rules) == 1
    with pytest.raises(NftError, match="syntax error"):
        Nft().run("add tabel inet x")


def test_one_context_is_safe_to_share_between_threads(table: str) -> None:
    with Nft() as nft:
        nft.json(_add(table))

        def add(k: int) -> None:
            for i in range(20):
                nft.json({"nftables": [{"add": {"element": {"family": "inet", "table": table, "name": "s",
                                                            "elem": [f"10.{k}.0.{i}"]}}}]})  # fmt: skip

        threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        listing = nft.json({"nftables": [{"list": {"set": {"family": "inet", "table": table, "name": "s"}}}]})
    assert len(next(o["set"] for o in listing["nftables"] if "set" in o)["elem"]) == 80


def test_a_closed_context_refuses_work() -> None:
    nft = Nft()
    nft.close()
    nft.close()
    with pytest.raises(NftError, match="closed"):
        nft.run("list tables")
