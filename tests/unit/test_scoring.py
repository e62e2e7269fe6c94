"""The pure parts of shaping a worker's answer (``scheduler.scoring``)."""

from __future__ import annotations

from scheduler.scoring import slices


def test_slices_give_each_member_its_own_part_in_order() -> None:
    results = ["a", "b", "c", "d", "e", "f"]
    assert [results[part] for part in slices([2, 1, 3])] == [["a", "b"], ["c"], ["d", "e", "f"]]


def test_slices_of_no_members_and_of_empty_members() -> None:
    assert slices([]) == []
    assert slices([0, 2, 0]) == [slice(0, 0), slice(0, 2), slice(2, 2)]
