"""Agent uid slots: two stacks on one host never get the same agent uids, and a stack keeps its slot."""

from __future__ import annotations

import json
from pathlib import Path

from faramesh.engine.paths import StackPaths
from faramesh.supervisor.layout import UID_STACK_SLOTS, _stack_slot, allocate_slot


def _paths(root: Path, stack_id: str) -> StackPaths:
    return StackPaths(stack_id, root / stack_id, root / "run" / stack_id, root / "log" / stack_id)


def _colliding_ids() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for n in range(10_000):
        sid = f"stack{n}-0000000{n % 10}"
        slot = _stack_slot(sid)
        if slot in seen:
            return seen[slot], sid
        seen[slot] = sid
    raise AssertionError("no collision found")


def test_colliding_stacks_get_different_slots_and_keep_them(tmp_path: Path) -> None:
    first, second = _colliding_ids()
    assert _stack_slot(first) == _stack_slot(second)
    a = allocate_slot(_paths(tmp_path, first))
    b = allocate_slot(_paths(tmp_path, second))
    assert a == _stack_slot(first)
    assert b != a and 0 <= b < UID_STACK_SLOTS
    # stable across applies
    assert allocate_slot(_paths(tmp_path, first)) == a
    assert allocate_slot(_paths(tmp_path, second)) == b
    registry = json.loads((tmp_path / "uid-slots.json").read_text())
    assert registry["slots"] == {first: a, second: b}
    assert (tmp_path / "uid-slots.json").stat().st_mode & 0o777 == 0o600


def test_a_corrupt_registry_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "uid-slots.json").write_text("{not json")
    sid = "corrupt-12345678"
    assert allocate_slot(_paths(tmp_path, sid)) == _stack_slot(sid)


def test_a_registry_symlink_is_refused(tmp_path: Path) -> None:
    import pytest

    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (tmp_path / "uid-slots.json").symlink_to(target)
    with pytest.raises(OSError):
        allocate_slot(_paths(tmp_path, "s-00000000"))
