"""Conformance with Nova 34 on the corpus (tests/data/numa-corpus.jsonl, docs/NUMA.md).

Every case runs through the compiled fitter (given the host dict, and given a compiled host
snapshot) and through the plain-Python reference, in
the three tiers of the corpus: (1) fit / no fit equals ``intended``; (2) every placement is
valid; (3) host cells equal ``intended`` and pinning equals ``intended_sorted``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from numa_fixtures import corpus, placement_problems

from fastcompute.resources import numa, numa_reference

Fitter = Callable[[dict[str, Any], dict[str, Any], dict[str, Any] | None], dict[str, Any] | None]

FITTERS: dict[str, Fitter] = {
    "compiled": numa.fit,
    "compiled-snapshot": lambda host, request, limits: numa.fit(
        numa.compile_host(host), request, limits
    ),
    "reference": numa_reference.fit,
}
CASES = {case["id"]: case for case in corpus()}
_answers: dict[tuple[str, str], dict[str, Any] | None] = {}


def answer(fitter: str, case_id: str) -> dict[str, Any] | None:
    """The fitter's placement for the case, computed once for the three tiers."""
    key = (fitter, case_id)
    if key not in _answers:
        case = CASES[case_id]
        _answers[key] = FITTERS[fitter](case["host"], case["request"], case["limits"])
    return _answers[key]


@pytest.fixture(params=sorted(FITTERS))
def fitter(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_tier1_fit_agrees_with_intended(fitter: str, case_id: str) -> None:
    case = CASES[case_id]
    got = answer(fitter, case_id)
    assert (got is not None) == (case["intended"] is not None), case["checks"]["quirks"]


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_tier2_placement_is_valid(fitter: str, case_id: str) -> None:
    case = CASES[case_id]
    got = answer(fitter, case_id)
    if got is not None:
        assert placement_problems(case["host"], case["request"], case["limits"], got) == []


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_tier3_same_cells_and_pinning_as_intended(fitter: str, case_id: str) -> None:
    case = CASES[case_id]
    got = answer(fitter, case_id)
    if case["intended"] is None:
        assert got is None
        return
    assert got is not None
    assert [c["host_cell"] for c in got["cells"]] == [
        c["host_cell"] for c in case["intended"]["cells"]
    ]
    assert got == case["intended_sorted"]


def test_corpus_covers_every_family_and_quirk() -> None:
    """The copy in tests/data is the whole corpus, with Nova's known bugs in it."""
    families = {case["family"] for case in CASES.values()}
    quirks = {q for case in CASES.values() for q in case["checks"]["quirks"]}
    assert len(CASES) == 1230
    assert {"random", "hard_8cell_128pcpu"} <= families
    assert {"nova_false_fit", "nova_false_nofit", "nova_result_invalid"} <= quirks


def test_quirk_cases_follow_intended_not_nova() -> None:
    """Where Nova's own answer is wrong, the fitter gives the intended one instead."""
    differing = [
        case
        for case in CASES.values()
        if {"nova_false_fit", "nova_false_nofit"} & set(case["checks"]["quirks"])
    ]
    assert differing
    for case in differing:
        for name in FITTERS:
            got = answer(name, case["id"])
            assert (got is None) == (case["intended"] is None)
            assert (got is None) != (case["result"] is None)


def test_huge_pages_fit_where_small_page_memory_is_used_up() -> None:
    """Nova 34 checks a requested page size against its pool, not the cell's free memory: a
    pinned huge-page guest fits a cell whose small-page memory other guests have used up."""
    cases = [c for c in CASES.values() if c["family"] == "handmade:hugepages_free_pool_small_memory_used"]
    assert len(cases) == 4
    for case in cases:
        cell = case["host"]["cells"][0]
        if case["request"]["cells"][0]["pagesize"] and case["request"]["cells"][0]["cpu_policy"] == "dedicated":
            assert cell["memory"] - cell["memory_usage"] < case["request"]["cells"][0]["memory"]
        for name in FITTERS:
            got = answer(name, case["id"])
            assert (got is None) == (case["result"] is None), (name, case["id"])
            if got is not None:
                assert got["cells"][0]["host_cell"] == 0 and got["cells"][0]["pagesize"] == 2048


def test_validity_checker_flags_novas_invalid_answers() -> None:
    """The tier-2 checker is not vacuous: it rejects the answers the corpus marks invalid."""
    invalid = [c for c in CASES.values() if "nova_result_invalid" in c["checks"]["quirks"]]
    assert invalid
    for case in invalid:
        assert placement_problems(case["host"], case["request"], case["limits"], case["result"])
