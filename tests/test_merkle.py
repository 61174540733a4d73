"""The merkle tree: canonical shape against a from-the-spec reference, batched updates that emit
exactly the live nodes, diff against plain dicts, O(depth) reads in a 100k directory, and a strict
node decoder."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from backer.errors import DecodeError, InvalidPathError
from backer.ids import Hash, hash_bytes
from backer.index.merkle import (
    EMPTY_ROOT,
    FANOUT,
    LISTING_MAX,
    Buckets,
    Item,
    Listing,
    PullWalk,
    TreeUpdate,
    build,
    decode_node,
    diff,
    encode_node,
    leaves,
    lookup,
    node_hash,
    reachable,
    update,
)

State = dict[str, Hash]
H = Hash(bytes(range(32)))


def leaf(path: str, version: int = 0) -> Hash:
    return hash_bytes("leaf", f"{path}\x00{version}".encode())


class Store:
    """A node store kept from `added`/`removed` alone, counting reads."""

    def __init__(self) -> None:
        self.nodes: dict[Hash, bytes] = {}
        self.reads = 0

    def read(self, node: Hash) -> bytes:
        self.reads += 1
        return self.nodes[node]

    def apply(self, result: TreeUpdate) -> Hash:
        assert not result.added.keys() & result.removed
        assert not result.added.keys() & self.nodes.keys(), "re-added a live node"
        assert result.removed <= self.nodes.keys(), "removed a node it never had"
        self.nodes.update(result.added)
        for node in result.removed:
            del self.nodes[node]
        return result.root


def items_of(store: Store, node: Hash) -> dict[str, Item]:
    """Every item of a directory node, its buckets expanded."""
    decoded = decode_node(store.nodes[node])
    if isinstance(decoded, Listing):
        return {item.name: item for item in decoded.items}
    return {k: v for slot in decoded.slots if slot for k, v in items_of(store, slot).items()}


def stored(state: State) -> tuple[Store, Hash]:
    store = Store()
    return store, store.apply(build(state.items()))


# --- a reference written straight from the spec: whole directories, rebuilt from scratch --------


def ref_node(items: list[Item], level: int, nodes: set[Hash]) -> Hash:
    if len(items) <= LISTING_MAX:
        node: Listing | Buckets = Listing(tuple(sorted(items, key=lambda i: i.name)))
    else:
        groups: list[list[Item]] = [[] for _ in range(FANOUT)]
        for item in items:
            byte = hash_bytes("bucket", item.name.encode())[level // 2]
            groups[byte >> 4 if level % 2 == 0 else byte & 15].append(item)
        slots = tuple(ref_node(g, level + 1, nodes) if g else None for g in groups)
        node = Buckets(len(items), slots)
    digest = node_hash(encode_node(node))
    nodes.add(digest)
    return digest


def ref_items(state: State, directory: str, nodes: set[Hash]) -> list[Item]:
    start = directory + "/" if directory else ""
    names = {p[len(start) :].split("/")[0] for p in state if p.startswith(start)}
    items = []
    for name in names:
        path = start + name
        if any(p.startswith(path + "/") for p in state):
            below = ref_items(state, path, nodes)
            if path in state:
                below.append(Item(".", False, state[path]))
            items.append(Item(name, True, ref_node(below, 0, nodes)))
        else:
            items.append(Item(name, False, state[path]))
    return items


def reference(state: State) -> tuple[Hash, set[Hash]]:
    nodes: set[Hash] = set()
    root = ref_node(ref_items(state, "", nodes), 0, nodes)
    nodes.discard(EMPTY_ROOT)
    return root, nodes


# --- strategies: nested names, leaf/subtree flips, and directories that cross LISTING_MAX -------


def first_nibble(name: str) -> int:
    return hash_bytes("bucket", name.encode())[0] >> 4


# Names that all land in bucket 0 of a directory: enough of them make a level-1 Buckets node.
SKEWED = [n for n in (f"s{i}" for i in range(2000)) if first_nibble(n) == 0][:60]
nested = st.lists(st.sampled_from(["a", "b", "é", "-"]), min_size=1, max_size=3).map("/".join)
paths = st.one_of(nested, st.integers(0, 79).map(lambda i: f"a/w{i}"), st.just("a/w3/x"))
SIZES = [0, 0, 5, 31, 32, 33, 34, 45, 80]


@st.composite
def states(draw: st.DrawFn) -> State:
    """A few nested paths, plus runs of a wide directory `a/`, of the root, and of bucket 0 of
    `k/`, sized around LISTING_MAX, with some entries dropped and some at another version."""
    picked = draw(st.dictionaries(paths, st.integers(0, 2), max_size=10))
    for names in (
        [f"a/w{i}" for i in range(80)],
        [f"r{i}" for i in range(80)],
        [f"k/{n}" for n in SKEWED] + [f"k/t{i}" for i in range(20)],
    ):
        count = draw(st.sampled_from(SIZES))
        dropped = draw(st.sets(st.integers(0, 79), max_size=3))
        bumped = draw(st.sets(st.integers(0, 79), max_size=3))
        picked |= {n: int(i in bumped) for i, n in enumerate(names[:count]) if i not in dropped}
    return {p: leaf(p, v) for p, v in picked.items()}


def changes_between(old: State, new: State) -> list[tuple[str, Hash | None]]:
    return [(p, new.get(p)) for p in sorted(old.keys() | new.keys()) if old.get(p) != new.get(p)]


@settings(max_examples=60, deadline=None)
@given(start=states(), target=states(), rnd=st.randoms(use_true_random=False))
def test_root_and_nodes_independent_of_order_and_batching(
    start: State, target: State, rnd: random.Random
) -> None:
    built = build(target.items())
    ref_root, ref_nodes = reference(target)
    assert built.root == ref_root
    assert set(built.added) == ref_nodes
    shuffled = list(target.items())
    rnd.shuffle(shuffled)
    assert build(shuffled).root == ref_root

    store, root = stored(start)
    todo = changes_between(start, target)
    rnd.shuffle(todo)
    while todo:
        cut = rnd.randint(1, len(todo))
        root = store.apply(update(store.read, root, dict(todo[:cut])))
        todo = todo[cut:]
    assert root == ref_root
    assert store.nodes.keys() == ref_nodes == set(reachable(store.read, root))


@settings(max_examples=60, deadline=None)
@given(
    state=states(), kind=st.sampled_from(["edit", "add", "remove"]), pick=st.integers(0), new=paths
)
def test_any_single_change_changes_the_root(state: State, kind: str, pick: int, new: str) -> None:
    assume(new not in state if kind == "add" else bool(state))
    path = new if kind == "add" else sorted(state)[pick % len(state)]
    change = None if kind == "remove" else leaf(path, 99)
    store, root = stored(state)
    old_nodes = dict(store.nodes)
    new_root = store.apply(update(store.read, root, {path: change}))
    assert new_root != root
    after = {p: v for p, v in {**state, path: change}.items() if v is not None}
    assert new_root == reference(after)[0]
    assert list(diff(old_nodes.__getitem__, root, store.read, new_root)) == [path]


@settings(max_examples=80, deadline=None)
@given(a=states(), b=states())
def test_diff_is_the_symmetric_difference(a: State, b: State) -> None:
    store_a, root_a = stored(a)
    store_b, root_b = stored(b)
    expected = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    assert sorted(diff(store_a.read, root_a, store_b.read, root_b)) == expected
    assert sorted(diff(store_b.read, root_b, store_a.read, root_a)) == expected


wide_states = st.dictionaries(
    st.integers(0, 99).map(lambda i: f"w/{i}"), st.integers(0, 1), min_size=20, max_size=100
).map(lambda d: {p: leaf(p, v) for p, v in d.items()})


@settings(max_examples=60, deadline=None)
@given(a=wide_states, b=wide_states)
def test_diff_of_bucketed_directories(a: State, b: State) -> None:
    store_a, root_a = stored(a)
    store_b, root_b = stored(b)
    expected = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    assert sorted(diff(store_a.read, root_a, store_b.read, root_b)) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"x": leaf("x")}, {"x": leaf("x"), "x/y": leaf("x/y")}),  # leaf vs subtree, same "."
        ({"x": leaf("x")}, {"x/y": leaf("x/y")}),  # file vs directory without own leaf
        ({"x": leaf("x", 1)}, {"x": leaf("x"), "x/y": leaf("x/y"), "x/z/w": leaf("x/z/w")}),
        ({f"d/{i}": leaf(f"d/{i}") for i in range(40)}, {"d": leaf("d")}),  # buckets vs leaf
        (
            {f"d/{i}": leaf(f"d/{i}") for i in range(40)},
            {f"d/{i}": leaf(f"d/{i}") for i in range(9)},
        ),
        ({}, {"a/b/c": leaf("a/b/c")}),
    ],
)
def test_diff_file_against_directory(a: State, b: State) -> None:
    store_a, root_a = stored(a)
    store_b, root_b = stored(b)
    expected = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    assert sorted(diff(store_a.read, root_a, store_b.read, root_b)) == expected
    assert sorted(diff(store_b.read, root_b, store_a.read, root_a)) == expected


@settings(max_examples=40, deadline=None)
@given(state=states(), probes=st.lists(paths, max_size=5))
def test_lookup_and_leaves_match_the_dict(state: State, probes: list[str]) -> None:
    store, root = stored(state)
    assert list(leaves(store.read, root)) == sorted(state.items(), key=lambda kv: kv[0].split("/"))
    for path in [*state, *probes]:
        assert lookup(store.read, root, path) == state.get(path)
    item = items_of(store, root).get("a") if state else None
    if item is not None and item.subtree:
        below = {p: h for p, h in state.items() if p == "a" or p.startswith("a/")}
        expected = sorted(below.items(), key=lambda kv: kv[0].split("/"))
        assert list(leaves(store.read, item.hash, "a")) == expected


def test_leaves_put_a_directory_before_its_children() -> None:
    names = ["-", "a", "a/-", "a/.x", "a/b", "a/b/c", "a-", "b"]  # not str order: "a-" < "a/"
    store, root = stored({p: leaf(p) for p in reversed(names)})
    assert [p for p, _ in leaves(store.read, root)] == names


def test_200_random_updates_keep_exactly_the_reachable_nodes() -> None:
    rnd = random.Random(2026)
    pool = (
        [f"r{i}" for i in range(45)]
        + [f"d/x{i}" for i in range(70)]
        + ["d", "d/x3/y", "d/x3/y/z", "d/x4/q", "e", "e/f/g", "e/f"]
    )
    state: State = {}
    store = Store()
    root = EMPTY_ROOT
    for step in range(200):
        batch: dict[str, Hash | None] = {}
        for path in rnd.sample(pool, rnd.randint(1, 12)):
            keep = rnd.random() < (0.4 if step % 50 > 30 else 0.75)  # grow, then shrink
            batch[path] = leaf(path, step) if keep else None
        before = set(reachable(store.read, root))
        result = update(store.read, root, batch)
        root = store.apply(result)
        state.update({p: v for p, v in batch.items() if v is not None})
        for path in [p for p, v in batch.items() if v is None]:
            state.pop(path, None)
        after = set(reachable(store.read, root))
        assert result.removed <= before and not result.removed & after
        assert result.added.keys() <= after and not result.added.keys() & before
    assert store.nodes.keys() == set(reachable(store.read, root))
    assert root == reference(state)[0]


def test_no_op_changes_write_nothing() -> None:
    state = {f"d/{i}": leaf(f"d/{i}") for i in range(100)} | {"f": leaf("f")}
    store, root = stored(state)
    for changes in ({"d/7": state["d/7"]}, {"nope": None}, {"d/7/x": None}, {"f/g": None}):
        result = update(store.read, root, changes)
        assert (result.root, result.added, result.removed) == (root, {}, frozenset())
    empty = update(store.read, EMPTY_ROOT, {"gone": None})
    assert (empty.root, empty.added, empty.removed) == (EMPTY_ROOT, {}, frozenset())


def test_buckets_collapse_back_into_a_listing() -> None:
    state = {f"d/{i}": leaf(f"d/{i}") for i in range(LISTING_MAX + 8)}
    store, root = stored(state)
    assert isinstance(decode_node(store.nodes[items_of(store, root)["d"].hash]), Buckets)
    gone = {f"d/{i}": None for i in range(8)}
    root = store.apply(update(store.read, root, gone))
    smaller = {p: h for p, h in state.items() if p not in gone}
    assert root == build(smaller.items()).root == reference(smaller)[0]
    assert len(store.nodes) == 2  # root listing and the one listing of d


def test_nested_buckets_collapse_and_grow_one_level_down() -> None:
    skewed = {f"k/{n}": leaf(f"k/{n}") for n in SKEWED[:40]}  # bucket 0 of k/ holds 40 names
    store, root = stored(skewed | {f"k/t{i}": leaf(f"k/t{i}") for i in range(20)})
    state = dict(skewed) | {f"k/t{i}": leaf(f"k/t{i}") for i in range(20)}
    k = decode_node(store.nodes[items_of(store, root)["k"].hash])
    assert isinstance(k, Buckets)
    assert isinstance(decode_node(store.nodes[k.slots[0] or H]), Buckets)
    for changes in (
        {f"k/{n}": None for n in SKEWED[:8]},  # bucket 0 shrinks to 32: a Listing again
        {f"k/{n}": leaf(n, 1) for n in SKEWED[:9]},  # and grows to 41
        {f"k/t{i}": None for i in range(20)} | {f"k/{n}": None for n in SKEWED[1:9]},
    ):
        root = store.apply(update(store.read, root, changes))
        state = {p: v for p, v in (state | changes).items() if v is not None}
        assert root == reference(state)[0]
        assert store.nodes.keys() == reference(state)[1]


def test_leaf_and_subtree_flips() -> None:
    store, root = stored({"a": leaf("a")})
    root = store.apply(update(store.read, root, {"a/b": leaf("a/b")}))
    assert lookup(store.read, root, "a") == leaf("a")
    root = store.apply(update(store.read, root, {"a/b": None}))
    assert root == build([("a", leaf("a"))]).root  # a subtree holding only "." is a leaf again
    root = store.apply(update(store.read, root, {"a": None, "a/b": leaf("a/b")}))
    assert root == build([("a/b", leaf("a/b"))]).root
    root = store.apply(update(store.read, root, {"a/b": None}))
    assert root == EMPTY_ROOT and store.nodes == {}


def test_deep_paths_need_no_recursion() -> None:
    deep = "/".join(["d"] * 1500)
    store, root = stored({deep: leaf(deep), "d": leaf("d")})
    assert lookup(store.read, root, deep) == leaf(deep)
    assert list(leaves(store.read, root)) == [("d", leaf("d")), (deep, leaf(deep))]
    assert list(diff(store.read, root, store.read, EMPTY_ROOT)) == ["d", deep]
    assert store.apply(update(store.read, root, {deep: None, "d": None})) == EMPTY_ROOT


def test_empty_tree_needs_no_reader() -> None:
    def no_reads(node: Hash) -> bytes:
        raise AssertionError("EMPTY_ROOT must not be read")

    assert build([]) == TreeUpdate(EMPTY_ROOT, {}, frozenset())
    assert node_hash(encode_node(Listing(()))) == EMPTY_ROOT
    assert lookup(no_reads, EMPTY_ROOT, "a") is None
    assert list(leaves(no_reads, EMPTY_ROOT)) == []
    assert list(reachable(no_reads, EMPTY_ROOT)) == []
    assert list(diff(no_reads, EMPTY_ROOT, no_reads, EMPTY_ROOT)) == []
    one = build([("a", leaf("a"))])
    assert list(diff(no_reads, EMPTY_ROOT, one.added.__getitem__, one.root)) == ["a"]


def test_bad_input_is_refused() -> None:
    store, root = stored({"a": leaf("a")})
    for path in ("", "/a", "a//b", "../a", "a/./b", ".backer/x", "a\\b", "x\x00"):
        with pytest.raises(InvalidPathError):
            update(store.read, root, {path: leaf(path)})
    with pytest.raises(ValueError, match="32 bytes"):
        update(store.read, root, {"b": Hash(b"short")})
    with pytest.raises(ValueError, match="twice"):
        build([("a", leaf("a")), ("a", leaf("a", 1))])
    with pytest.raises(KeyError):
        lookup(Store().read, root, "a")
    other = build([("b", leaf("b"))])
    with pytest.raises(DecodeError):  # bytes that are not the node asked for
        lookup(lambda _node: other.added[other.root], root, "a")


def test_hostile_trees_cannot_name_reserved_or_dot_paths() -> None:
    for name in (".backer", "."):
        store = Store()
        data = encode_node(Listing((Item(name, False, H),)))
        store.nodes[node_hash(data)] = data
        with pytest.raises(DecodeError):
            list(leaves(store.read, node_hash(data)))


# --- a 100,000-entry flat directory ------------------------------------------------------------

BIG = 100_000


@pytest.fixture(scope="module")
def big() -> tuple[Store, Hash, State]:
    state = {f"file-{i:06d}.dat": leaf(f"file-{i:06d}.dat") for i in range(BIG)}
    store, root = stored(state)
    return store, root, state


def path_to(store: Store, root: Hash, path: str) -> list[bytes]:
    """The encoded nodes a lookup of `path` reads, root first."""
    seen: list[bytes] = []

    def read(node: Hash) -> bytes:
        seen.append(store.nodes[node])
        return store.nodes[node]

    assert lookup(read, root, path) is not None
    return seen


def test_big_directory_changes_read_and_write_the_bucket_path(
    big: tuple[Store, Hash, State],
) -> None:
    store, root, _ = big
    depth = max(len(path_to(store, root, f"file-{i:06d}.dat")) for i in range(0, BIG, 997))
    assert 3 <= depth <= 6
    edited = ["file-000001.dat", "file-050000.dat", "file-099999.dat"]
    added, dropped = ["new-1", "zz/new-2"], ["file-000002.dat", "file-077777.dat"]
    changes: dict[str, Hash | None] = {p: leaf(p, 1) for p in edited + added}
    changes |= dict.fromkeys(dropped)
    reader = Store()
    reader.nodes = store.nodes  # read-only use: the fixture's nodes stay as they are
    result = update(reader.read, root, changes)
    assert reader.reads <= len(changes) * depth
    assert len(result.added) <= len(changes) * depth + 1
    assert len(result.removed) <= len(changes) * depth

    both = Store()
    both.nodes = {**store.nodes, **result.added}
    found = list(diff(both.read, root, both.read, result.root))
    assert sorted(found) == sorted(changes)
    assert both.reads <= 2 * len(changes) * depth

    both.reads = 0
    depth = len(path_to(store, root, "file-042000.dat"))
    one = update(both.read, root, {"file-042000.dat": leaf("file-042000.dat", 5)})
    assert both.reads == depth < 20
    assert len(one.added) == len(one.removed) == depth
    both.nodes.update(one.added)
    both.reads = 0
    assert list(diff(both.read, root, both.read, one.root)) == ["file-042000.dat"]
    assert both.reads == 2 * depth < 20


def test_every_node_the_tree_produces_decodes(big: tuple[Store, Hash, State]) -> None:
    store, _, _ = big
    nested_tree = build((f"d{i // 100}/f{i}", leaf(str(i))) for i in range(5000))
    for data in [*store.nodes.values(), *nested_tree.added.values()]:
        assert encode_node(decode_node(data)) == data


# --- the strict decoder ------------------------------------------------------------------------


def pack(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


LISTING = pack([0, [["a", 0, H], ["b", 1, H]]])
BUCKETS = pack([1, 40, [H] + [None] * 15])
REJECTED = {
    "empty": b"",
    "garbage": b"\xc1\xc1",
    "not an array": pack({"a": 1}),
    "truncated listing": LISTING[:-1],
    "truncated buckets": BUCKETS[:-5],
    "trailing bytes": LISTING + b"\x00",
    "unknown tag": pack([2, []]),
    "tag as bool": pack([False, []]),
    "tag as float": pack([0.0, []]),
    "listing with extra field": pack([0, [], 1]),
    "items not an array": pack([0, "ab"]),
    "unsorted": pack([0, [["b", 0, H], ["a", 0, H]]]),
    "duplicate": pack([0, [["a", 0, H], ["a", 0, H]]]),
    "oversized listing": pack([0, [[f"n{i:02d}", 0, H] for i in range(LISTING_MAX + 1)]]),
    "short hash": pack([0, [["a", 0, H[:31]]]]),
    "long hash": pack([0, [["a", 0, H + b"x"]]]),
    "hash as str": pack([0, [["a", 0, "x" * 32]]]),
    "name as bytes": pack([0, [[b"a", 0, H]]]),
    "dotdot": pack([0, [["..", 0, H]]]),
    "slash": pack([0, [["a/b", 0, H]]]),
    "nul": pack([0, [["x\x00", 0, H]]]),
    "empty name": pack([0, [["", 0, H]]]),
    "not NFC": pack([0, [["e\u0301", 0, H]]]),
    "dot as subtree": pack([0, [[".", 1, H]]]),
    "flag 2": pack([0, [["a", 2, H]]]),
    "flag as bool": pack([0, [["a", True, H]]]),
    "item too short": pack([0, [["a", 0]]]),
    "count 32": pack([1, 32, [H] + [None] * 15]),
    "count as bool": pack([1, True, [H] + [None] * 15]),
    "15 slots": pack([1, 40, [H] + [None] * 14]),
    "17 slots": pack([1, 40, [H] + [None] * 16]),
    "all slots empty": pack([1, 40, [None] * 16]),
    "slot 31 bytes": pack([1, 40, [H[:31]] + [None] * 15]),
    "slot as int": pack([1, 40, [0] + [None] * 15]),
    "count non-minimal": b"\x93\x01\xcd\x00\x28" + BUCKETS[3:],
    "fixstr as str8": b"\x92\x00\x91\x93\xd9\x01a\x00" + pack(H),
    "ext": b"\x92\x00\xd4\x01\x00",
    "too big": pack([0, []]) + b"\x00" * 20_000,
}


@pytest.mark.parametrize("data", list(REJECTED.values()), ids=list(REJECTED))
def test_decode_node_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_node(data)


def test_decode_node_accepts_canonical_nodes() -> None:
    assert decode_node(LISTING) == Listing((Item("a", False, H), Item("b", True, H)))
    assert decode_node(BUCKETS) == Buckets(40, (H, *[None] * 15))
    assert decode_node(pack([0, [[".", 0, H], ["a", 0, H]]])) == Listing(
        (Item(".", False, H), Item("a", False, H))
    )


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([LISTING, BUCKETS]), at=st.integers(0, 200), byte=st.integers(0, 255))
def test_decode_node_mutations_fail_cleanly(base: bytes, at: int, byte: int) -> None:
    data = bytearray(base)
    data[at % len(data)] = byte
    try:
        node = decode_node(bytes(data))
    except DecodeError:
        return
    assert encode_node(node) == bytes(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120))
def test_decode_node_random_bytes_fail_cleanly(data: bytes) -> None:
    try:
        node = decode_node(data)
    except DecodeError:
        return
    assert encode_node(node) == data


# --- PullWalk: the level-by-level diff a puller drives over the network ---------------------


def _pull(local: dict[str, Hash], remote: dict[str, Hash]) -> tuple[dict[str, Hash], int]:
    """Run a PullWalk of `remote` against `local`; return what it found and its rounds."""
    local_store, local_root = stored(local)
    remote_store, remote_root = stored(remote)
    walk = PullWalk(local_store.read, local_root, remote_root)
    rounds = 0
    while not walk.done:
        rounds += 1
        walk.advance({h: remote_store.read(h) for h in walk.needed()})
    return dict(walk.found), rounds


def _expected_pull(local: dict[str, Hash], remote: dict[str, Hash]) -> dict[str, Hash]:
    return {p: h for p, h in remote.items() if local.get(p) != h}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pull_walk_finds_exactly_what_the_remote_has_newer(data: st.DataObject) -> None:
    base = data.draw(states())
    local = dict(base)
    remote = dict(base)
    for path in data.draw(st.lists(st.sampled_from(sorted(base) or ["x"]), max_size=5)):
        remote[path] = leaf(path + "~remote")
    for path in data.draw(st.lists(paths, max_size=4)):
        local[path] = leaf(path + "~local")
    for path in data.draw(st.lists(paths, max_size=4)):
        remote[path] = leaf(path + "~new")
    found, _ = _pull(local, remote)
    assert found == _expected_pull(local, remote)


def test_pull_walk_rounds_follow_depth_in_a_100k_directory() -> None:
    base = {f"d/f{i:06d}": leaf(f"d/f{i:06d}") for i in range(100_000)}
    remote = dict(base)
    remote["d/f012345"] = leaf("changed")
    remote["d/new"] = leaf("new")
    found, rounds = _pull(base, remote)
    assert found == {"d/f012345": remote["d/f012345"], "d/new": remote["d/new"]}
    assert rounds <= 7  # root, d's buckets (3-4 levels), listings


def test_pull_walk_listing_against_buckets_both_ways() -> None:
    small = {f"f{i}": leaf(f"f{i}") for i in range(20)}
    big = {f"f{i}": leaf(f"f{i}") for i in range(200)}
    assert _pull(small, big)[0] == _expected_pull(small, big)
    assert _pull(big, small)[0] == {}


def test_pull_walk_refuses_forged_nodes() -> None:
    _, remote_root = stored({"a/b": leaf("a/b")})
    local_store, local_root = stored({})
    walk = PullWalk(local_store.read, local_root, remote_root)
    with pytest.raises(DecodeError):
        walk.advance({h: b"\x92\x00\x90" for h in walk.needed()})
    walk = PullWalk(local_store.read, local_root, remote_root)
    with pytest.raises(KeyError):
        walk.advance({})
