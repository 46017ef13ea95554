"""The parts that let sign and verify stream at any scale: record keys, the plain-line parser,
the window and the external sort. No HSM: these are pure."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from p11guard.cli._extsort import FAN_IN, ExternalSort
from p11guard.cli._keyorder import KeyOrder, groups, line_id, line_key, path_key
from p11guard.cli._records import iter_records, parse_entry, signature_line

pytestmark = pytest.mark.timeout(60)

NAMES = ["a", "a.txt", "a-b", "a0", "b", "Z", "ü.txt", "with space", "ab", "a b", "~", "0"]


def _tree(root: Path, rng: random.Random, depth: int = 0) -> None:
    root.mkdir()
    for name in rng.sample(NAMES, 6):
        if depth < 2 and rng.random() < 0.4:
            _tree(root / name, rng, depth + 1)
        else:
            (root / name).write_text(name)


@pytest.mark.parametrize("seed", range(5))
def test_path_keys_sort_as_the_walk_reads(tmp_path: Path, seed: int) -> None:
    root = tmp_path / "tree"
    _tree(root, random.Random(seed))
    (root / b"raw-\xff".decode(errors="surrogateescape")).write_text("a name that is not UTF-8")
    (root / "link").symlink_to(root / "a.txt")  # links are not records
    ids = [r.id for r in iter_records(root)]
    assert len(ids) > 6
    by_os_walk = []  # the order sign has always written
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        by_os_walk += [Path(folder, f).relative_to(root).as_posix() for f in sorted(files) if f != "link"]
    assert ids == by_os_walk
    keys = [path_key(rid) for rid in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), ids


def test_line_keys_are_canonical_numbers() -> None:
    assert [line_key(x) for x in ("1", "42", "9" * 19)] == [1, 42, int("9" * 19)]
    assert [line_key(x) for x in ("0", "03", "-1", "1.0", "\u00b2", "1" * 20, "", " 1")] == [None] * 8


def _line(rid: str = "7", **extra: object) -> bytes:
    line = signature_line(rid, b"data", b"\x30\x06sig", "release-key", "ecdsa-sha256", "ab" * 32)
    if not extra:
        return line
    entry = json.loads(line)
    entry.update(extra)
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


TRICKY = [
    _line(),
    _line(replaces=3),
    _line("sub/file name.txt"),
    _line("ü/ß"),  # escaped by json.dumps: the JSON path
    _line(replaces=True),
    _line(replaces=0),
    _line(replaces=1.0),
    _line(sha256="AB" * 32),
    _line(signature="abc"),
    _line(signature="ab=c"),
    _line(signature="abcd="),
    _line(signature="ab="),
    _line(signature="abc="),
    _line(signature="ab=="),
    _line(signature="a==="),
    _line(signature="abcde==="),
    _line(key_sha256=None),
    _line(key_sha256="x"),
    _line(id=7),
    _line(extra="field"),
    _line()[:-2] + b',"id":"8"}\n',  # a second "id": JSON takes the last
    b'{"id":"7","sha256":"' + b"a" * 64 + b'","signature":"","key":"k","mechanism":"m"}\n',
    b'{"id":"7","sha256":"' + b"a" * 64 + b'","signature":"","key":"k\x01","mechanism":"m"}\n',
    b'{"id":"\\u0037","sha256":"' + b"a" * 64 + b'","signature":"","key":"k","mechanism":"m"}\n',
    b"[1, 2]\n",
    b"garbage\n",
    _line()[:-1],  # no line ending
    _line()[:-1] + b"\r\n",
]


@pytest.mark.parametrize("line", TRICKY)
def test_the_plain_fast_path_agrees_with_json(line: bytes) -> None:
    by_json = parse_entry(line.rstrip(b"\r\n") + b" \n")  # a trailing space: never the plain form
    assert parse_entry(line) == by_json
    entry = by_json[0]
    try:
        decoded = json.loads(line)
    except ValueError:
        decoded = None
    expected = decoded.get("id") if isinstance(decoded, dict) and isinstance(decoded.get("id"), str) else None
    if expected is not None:  # (a line that is no JSON may get any id: it is malformed anyway)
        assert line_id(line) == expected
    if entry is not None:
        assert entry["id"] == expected


def test_external_sort_spills_and_merges_in_rounds(tmp_path: Path) -> None:
    rng = random.Random(1)
    items = [(rng.randrange(10**6), i, os.urandom(rng.randrange(0, 40))) for i in range(2000)]
    sorter = ExternalSort(tmp_path, max_bytes=500)  # a run every ~4 items: more runs than FAN_IN
    for item in items:
        sorter.add(item)
    assert len(list(tmp_path.iterdir())) > FAN_IN
    assert list(sorter) == sorted(items)
    assert list(sorter) == sorted(items)  # again: iterating does not consume it
    small = ExternalSort(tmp_path / "none")  # never spills: needs no folder
    for item in items[:10]:
        small.add(item)
    assert list(small) == sorted(items[:10])


def _items(keys: list[int]) -> list[tuple[int, int, bytes]]:
    return [(k, n, b"line %d" % n) for n, k in enumerate(keys, 1)]


@pytest.mark.parametrize(
    ("keys", "window", "rest"),
    [
        (list(range(1, 50)), 4, 0),  # in order
        ([2, 1, 4, 3, 6, 5, 8, 7], 1, 0),  # each one place out: a window of one puts it back
        ([3, 1, 2, 5, 4], 2, 0),
        ([5, 1, 2, 3, 4], 2, 0),  # early lines wait in the window until their turn
        ([3, 4, 5, 1, 2], 2, 2),  # late by more than the window: 1 and 2 go to the sort
        ([*range(1, 30), 7, 3], 4, 2),  # late lines (a re-sign, a duplicate): sorted on disk
        ([1, 1, 1, 2, 2], 8, 3),  # duplicates are never "in order"
    ],
)
def test_the_window_and_the_rest(tmp_path: Path, keys: list[int], window: int, rest: int) -> None:
    items = _items(keys)
    order = KeyOrder(tmp_path, window=window, sort_bytes=150)
    order.first_pass(items)
    assert order.rest.count == rest
    assert list(order.second_pass(items)) == sorted(items)
    grouped = list(groups(order.second_pass(items)))
    assert [k for k, _ in grouped] == sorted(set(keys))
    assert sum(len(lines) for _, lines in grouped) == len(keys)


def test_a_shuffled_file_comes_back_in_order(tmp_path: Path) -> None:
    keys = [*range(1, 3001), 17, 2999, 5]
    random.Random(7).shuffle(keys)
    items = _items(keys)
    order = KeyOrder(tmp_path, window=16, sort_bytes=4000)
    order.first_pass(items)
    assert 0 < order.rest.count < len(items)
    assert list(order.second_pass(items)) == sorted(items)
