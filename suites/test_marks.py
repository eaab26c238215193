"""The suites' own marks (suites/conftest.py, docs/suites.md): every test file says
whether it tests the engine under test or impl's internals, and every test that runs,
and counts, for an engine other than impl requests that engine. Tests planted into a
file of engine tests show the check has teeth, on the bug that prompted it: seven
tests of impl's PagedKVCache sat unmarked in test_cache_accounting and passed in
mlx-lm's run without touching mlx-lm."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from suites import conftest, test_cache_accounting, test_paged_cache
from suites.conftest import IMPL, engine_not_called, engine_skip_reason, select_for_engine

pytestmark = pytest.mark.impl_only("checks the suites' own marks (the harness), not an engine")

SUITES = Path(__file__).resolve().parent
OTHER = "mlx-lm"  # an engine but impl: the marks treat every such engine alike
KINDS = {"engine_suite", "impl_only"}
# The tests that moved from test_cache_accounting to test_paged_cache.
MOVED = [
    "test_tables_check_catches_stale_tables",
    "test_trim_counts_exactly",
    "test_trim_then_append_overwrites_the_dropped_rows",
    "test_trim_into_a_shared_block_copies_it_on_the_next_write",
    "test_trim_rejects_bad_input_and_changes_nothing",
    "test_trim_check_catches_blocks_kept_after_trim",
    "test_plan_is_fresh_only_when_every_sequence_was_empty",
]


def file_marks(path: Path) -> set[str]:
    """The marks (``pytest.mark.NAME``) that a test file's ``pytestmark`` names."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            names |= {
                sub.attr
                for sub in ast.walk(node.value)
                if isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Attribute)
                and sub.value.attr == "mark"
            }
    return names


@pytest.mark.parametrize("path", sorted(SUITES.glob("test_*.py")), ids=lambda p: p.name)
def test_every_file_says_what_it_tests(path: Path) -> None:
    kinds = file_marks(path) & KINDS
    assert len(kinds) == 1, f"{path.name}: pytestmark names {sorted(kinds)} of {sorted(KINDS)}"


def test_every_test_counted_for_an_engine_requests_it(request) -> None:
    """Over this run's tests (all of them in a full run; every ``--engine`` run also
    fails such a test at its setup)."""
    assert engine_not_called(request.session.items, OTHER) == []


def plant(request, module: ModuleType, fn: Callable, name: str | None = None) -> pytest.Function:
    """``fn`` as a test in ``module``'s file, collected as pytest collects one there."""
    package = pytest.Package.from_parent(request.session, path=SUITES)
    parent = pytest.Module.from_parent(package, path=Path(module.__file__))
    assert parent.obj is module  # and the file's pytestmark is read
    return pytest.Function.from_parent(parent, name=name or f"test{fn.__name__}", callobj=fn)


def _reads_a_checkpoint(checkpoint, metric) -> None: ...


def _loads_the_engine(checkpoint, engine_factory) -> None: ...


def _asks_the_engine(engine_cls) -> None: ...


@pytest.mark.impl_only("a planted test of impl's internals")
def _tests_impl(checkpoint) -> None: ...


def test_a_planted_test_that_never_requests_the_engine_is_caught(request) -> None:
    silent, loads, asks, internal = (
        plant(request, test_cache_accounting, fn)
        for fn in (_reads_a_checkpoint, _loads_the_engine, _asks_the_engine, _tests_impl)
    )
    planted = [silent, loads, asks, internal]
    assert silent.nodeid == "suites/test_cache_accounting.py::test_reads_a_checkpoint"
    assert engine_not_called(planted, OTHER) == [silent.nodeid]
    assert engine_not_called(planted, IMPL) == []  # impl runs every test, its internals too
    assert engine_skip_reason(internal, OTHER) == "a planted test of impl's internals"
    # Under --engine mlx-lm the silent one fails at setup, instead of passing.
    select_for_engine(planted, OTHER)
    with pytest.raises(pytest.fail.Exception, match="counted for engine mlx-lm but requests"):
        conftest.pytest_runtest_setup(silent)
    for ok in (loads, asks):
        conftest.pytest_runtest_setup(ok)
    assert internal.get_closest_marker("skip").kwargs["reason"] == (
        "engine mlx-lm: a planted test of impl's internals"
    )


@pytest.mark.parametrize("name", MOVED)
def test_the_moved_cache_tests_would_be_caught_where_they_were(request, name: str) -> None:
    """Back in test_cache_accounting, unmarked, each counts for mlx-lm and is caught; in
    test_paged_cache it is skipped for any engine but impl."""
    fn = getattr(test_paged_cache, name)
    back = plant(request, test_cache_accounting, fn, name)
    assert engine_not_called([back], OTHER) == [back.nodeid]
    here = plant(request, test_paged_cache, fn, name)
    assert engine_not_called([here], OTHER) == []
    assert engine_skip_reason(here, OTHER) == (
        "tests impl's paged cache (impl.paged_cache), not an engine"
    )
