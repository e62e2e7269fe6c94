"""The reviewed ImageNet-1k group table (general/groups.tsv, general/group_names.tsv)."""

from __future__ import annotations

from pathlib import Path

import pytest

GENERAL = Path(__file__).resolve().parents[2] / "worker_image" / "wanwu_worker" / "general"
NO_GROUP = "-"
DOGS = range(151, 269)  # every domestic dog breed, 151-268 inclusive
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _lines(name: str) -> list[str]:
    return GENERAL.joinpath(name).read_text(encoding="utf-8").splitlines()


def _tsv(name: str, header: list[str]) -> list[list[str]]:
    lines = _lines(name)
    assert lines[0].split("\t") == header
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == len(header) for row in rows), name
    return rows


@pytest.fixture(scope="module")
def rows() -> list[list[str]]:
    return _tsv("groups.tsv", ["class", "en", "zh", "group"])


@pytest.fixture(scope="module")
def group_of(rows: list[list[str]]) -> dict[int, str]:
    return {int(row[0]): row[3] for row in rows}


@pytest.fixture(scope="module")
def names() -> list[list[str]]:
    return _tsv("group_names.tsv", ["group", "en"])


def test_one_row_per_class_in_order(rows: list[list[str]]) -> None:
    assert [row[0] for row in rows] == [str(i) for i in range(1000)]


def test_names_match_the_labels_files(rows: list[list[str]]) -> None:
    en, zh = _lines("labels_en.txt"), _lines("labels_zh.txt")
    assert len(en) == len(zh) == 1000
    assert [row[1] for row in rows] == en
    assert [row[2] for row in rows] == zh


def test_groups_and_group_names_agree(rows: list[list[str]], names: list[list[str]]) -> None:
    used = {row[3] for row in rows} - {NO_GROUP}
    listed = [name[0] for name in names]
    assert set(listed) == used
    assert NO_GROUP not in listed


def test_group_names_are_unique_and_clean(names: list[list[str]]) -> None:
    zh = [name[0] for name in names]
    en = [name[1] for name in names]
    assert len(set(zh)) == len(zh)
    assert len(set(en)) == len(en)
    for name in zh + en:
        assert name and name == name.strip()
        assert not set(name) & set(",;，；"), name
    assert all(name == name.lower() for name in en)


def test_coverage(group_of: dict[int, str]) -> None:
    grouped = sum(group != NO_GROUP for group in group_of.values())
    assert grouped >= 850


def test_dogs_are_exactly_the_dog_breeds(group_of: dict[int, str]) -> None:
    assert {i for i, group in group_of.items() if group == "狗"} == set(DOGS)


def test_domestic_cats(group_of: dict[int, str]) -> None:
    assert all(group_of[i] == "猫" for i in CATS)


def test_wild_canids_and_big_cats_are_other_mammals(group_of: dict[int, str]) -> None:
    for i in (269, 272, 273, 275, 276, 277, 286, 288, 291, 292, 293):  # wolves, dingo, foxes, big cats
        assert group_of[i] == "哺乳动物", i


@pytest.mark.parametrize(
    ("index", "group"),
    [
        (0, "鱼"),  # tench
        (2, "鱼"),  # great white shark
        (97, "鸟"),  # drake
        (134, "鸟"),  # crane (the bird)
        (30, "两栖动物"),  # bullfrog
        (49, "爬行动物"),  # African crocodile
        (301, "昆虫"),  # ladybug
        (122, "无脊椎动物"),  # American lobster
        (147, "哺乳动物"),  # grey whale
        (948, "水果"),  # Granny Smith
        (937, "蔬菜"),  # broccoli
        (967, "食物"),  # espresso
        (926, "食物"),  # hot pot
        (963, "食物"),  # pizza
        (992, "植物"),  # agaric
        (980, "自然景观"),  # volcano
        (973, "自然景观"),  # coral reef
        (817, "车辆"),  # sports car
        (779, "车辆"),  # school bus
        (404, "飞机"),  # airliner
        (895, "飞机"),  # warplane
        (510, "船"),  # container ship
        (579, "乐器"),  # grand piano
        (526, "家具"),  # desk
        (638, "服装"),  # maillot
        (620, "电子产品"),  # laptop
        (497, "建筑"),  # church
        (784, "工具"),  # screwdriver
        (567, "厨房用品"),  # frying pan
        (805, "运动用品"),  # soccer ball
    ],
)
def test_spot_checks(group_of: dict[int, str], index: int, group: str) -> None:
    assert group_of[index] == group


def test_ambiguous_names(group_of: dict[int, str]) -> None:
    assert group_of[517] != "鸟"  # crane, the machine
    assert group_of[282] == "猫"  # tiger cat is a domestic cat
    assert group_of[383] == "哺乳动物"  # "Madagascar cat" is a lemur
    assert group_of[456] not in {"服装", "乐器"}  # bow, the weapon
