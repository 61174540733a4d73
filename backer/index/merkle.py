"""The folder tree: a pure, directory-shaped, content-addressed merkle tree of leaf hashes.

Owns the tree-node encoding (canonical msgpack, decoded strictly because peers send nodes), the
bucket rule that makes a directory's node depend only on its set of items, and batched updates
that *return* the nodes to write and the nodes that became unreachable. Pure: no I/O, no sqlite,
no asyncio, no clock; nodes are read through a `NodeReader`. Must not import anything above
`backer.index` (the store persists what `update` returns in one transaction).

`EMPTY_ROOT` is implicit: it is never read, never in `added` or `removed`, never yielded by
`reachable`, so the store need not hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from typing import Any

import msgpack

from backer.errors import DecodeError
from backer.ids import HASH_SIZE, Hash, hash_bytes
from backer.paths import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    RESERVED_DIR,
    check_name,
    check_path,
    is_reserved,
)

__all__ = [
    "EMPTY_ROOT",
    "FANOUT",
    "LISTING_MAX",
    "Buckets",
    "Item",
    "Listing",
    "NodeReader",
    "PullWalk",
    "TreeUpdate",
    "build",
    "decode_node",
    "diff",
    "encode_node",
    "leaves",
    "lookup",
    "node_hash",
    "reachable",
    "update",
]

LISTING_MAX = 32  # a directory (or bucket) of at most this many items is one Listing
FANOUT = 16  # slots of a Buckets node: one nibble of the name hash per bucket level
DOT = "."  # the item of a subtree directory that holds the directory path's own leaf
_MAX_LEVEL = 2 * HASH_SIZE  # nibbles in a name hash: no Buckets node can sit deeper
_MAX_NODE_BYTES = 16 * 1024  # a full listing of 255-byte names is ~9.4 KiB
_LIMITS = {"max_str_len": MAX_NAME_BYTES, "max_bin_len": HASH_SIZE, "max_array_len": LISTING_MAX}

NodeReader = Callable[[Hash], bytes]
"""Returns the encoded node stored under a hash; raises KeyError if unknown."""


@dataclass(frozen=True, slots=True)
class Item:
    """One member of a directory: a leaf (`subtree=False`) or a subdirectory's node hash."""

    name: str
    subtree: bool
    hash: Hash

    def __post_init__(self) -> None:
        if self.name != DOT:
            check_name(self.name)
        elif self.subtree:
            raise ValueError('the "." item holds a leaf, never a subtree')
        _check_hash(self.hash)


@dataclass(frozen=True, slots=True)
class Listing:
    """A directory (or one bucket of it) of at most LISTING_MAX items, sorted by name."""

    items: tuple[Item, ...]

    def __post_init__(self) -> None:
        if len(self.items) > LISTING_MAX:
            raise ValueError(f"a listing holds at most {LISTING_MAX} items")
        if any(a.name >= b.name for a, b in pairwise(self.items)):
            raise ValueError("listing items are not strictly ascending by name")


@dataclass(frozen=True, slots=True)
class Buckets:
    """A directory (or bucket) of more than LISTING_MAX items, split by one name-hash nibble."""

    count: int  # items below this node, in all its buckets
    slots: tuple[Hash | None, ...]

    def __post_init__(self) -> None:
        if self.count <= LISTING_MAX:
            raise ValueError(f"a Buckets node holds more than {LISTING_MAX} items")
        if len(self.slots) != FANOUT or all(slot is None for slot in self.slots):
            raise ValueError(f"a Buckets node has {FANOUT} slots, not all empty")
        for slot in self.slots:
            if slot is not None:
                _check_hash(slot)


@dataclass(frozen=True, slots=True)
class TreeUpdate:
    """The outcome of an update: the new root, nodes to write, nodes no longer reachable."""

    root: Hash
    added: dict[Hash, bytes]
    removed: frozenset[Hash]


def encode_node(node: Listing | Buckets) -> bytes:
    obj: list[Any]
    if isinstance(node, Listing):
        obj = [0, [[item.name, int(item.subtree), item.hash] for item in node.items]]
    else:
        obj = [1, node.count, list(node.slots)]
    return bytes(msgpack.packb(obj, use_bin_type=True))


def node_hash(data: bytes) -> Hash:
    return hash_bytes("tree node", data)


_EMPTY = Listing(())
EMPTY_ROOT: Hash = node_hash(encode_node(_EMPTY))


def decode_node(data: bytes) -> Listing | Buckets:
    """The node `data` encodes, if `data` is exactly its canonical encoding; else DecodeError."""
    if len(data) > _MAX_NODE_BYTES:
        raise DecodeError(f"tree node of {len(data)} bytes is larger than any valid node")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, max_map_len=0, max_ext_len=0, **_LIMITS)
    except (msgpack.UnpackException, ValueError) as exc:  # ValueError: limits, UTF-8, extra data
        raise DecodeError(f"tree node is not one msgpack value within node limits: {exc}") from exc
    try:
        node = _node_from(obj)
    except ValueError as exc:  # includes InvalidPathError from the item names
        raise DecodeError(f"invalid tree node: {exc}") from exc
    if encode_node(node) != data:
        raise DecodeError("tree node is not canonically encoded")
    return node


def update(read: NodeReader, root: Hash, changes: Mapping[str, Hash | None]) -> TreeUpdate:
    """Apply `changes` (path -> new leaf hash, or None to drop that path's own leaf; its
    descendants stay) to the tree under `root`, in one batch.

    Each affected directory, and the bucket path to each changed name in it, is read once and
    rewritten once; only final nodes are emitted.
    """
    touched: dict[str, Hash | None] = {}
    dirs: dict[str, set[str]] = {}  # directory path ("" = root) -> names changed in or below it
    for path, leaf in changes.items():
        check_path(path, indexed=True)
        if leaf is not None:
            _check_hash(leaf)
        touched[path] = leaf
        parent, name = _split(path)
        while name not in dirs.setdefault(parent, set()):  # else its ancestors are in already
            dirs[parent].add(name)
            if not parent:
                break
            parent, name = _split(parent)
    if not touched:
        return TreeUpdate(root, {}, frozenset())
    batch = _Batch(read)
    new_root = batch.run(root, touched, dirs)
    # An old node written again (a no-op change) stays; every other old node read is replaced.
    added = {node: data for node, data in batch.new.items() if node not in batch.old}
    return TreeUpdate(new_root, added, frozenset(batch.old.keys() - batch.new.keys()))


def build(leaves: Iterable[tuple[str, Hash]]) -> TreeUpdate:
    """The tree of `leaves` (path, leaf hash): `update` from EMPTY_ROOT."""
    changes: dict[str, Hash | None] = {}
    for path, leaf in leaves:
        if path in changes:
            raise ValueError(f"path {path!r} is given twice")
        changes[path] = leaf
    return update(_no_reader, EMPTY_ROOT, changes)


def lookup(read: NodeReader, root: Hash, path: str) -> Hash | None:
    """The leaf hash of `path`, or None if the path has no leaf (absent, or only a parent)."""
    load = partial(_load, read)
    *parents, last = check_path(path, indexed=True).split("/")
    directory = root
    for name in parents:
        item = _find(load, directory, name)
        if item is None or not item.subtree:
            return None
        directory = item.hash
    found = _find(load, directory, last)
    if found is not None and found.subtree:
        found = _find(load, found.hash, DOT)
    return None if found is None else found.hash


def leaves(read: NodeReader, root: Hash, prefix: str = "") -> Iterator[tuple[str, Hash]]:
    """Every (path, leaf hash) in the directory node `root` whose path is `prefix` ("" for the
    root), sorted depth-first: a directory's own leaf, then its children by name."""
    if prefix:
        check_path(prefix, indexed=True)
    load = partial(_load, read)
    stack = _sorted_children(load, root, prefix)  # explicit stack: paths may be 2,000 levels deep
    while stack:
        path, item = stack.pop()
        if item.subtree:
            stack.extend(_sorted_children(load, item.hash, path))
        else:
            yield path, item.hash


def diff(read_a: NodeReader, root_a: Hash, read_b: NodeReader, root_b: Hash) -> Iterator[str]:
    """Exactly the paths whose leaf differs between the two trees or exists in one only, in no
    particular order. Descends only where node hashes differ; each side is read by its reader."""
    load_a, load_b = partial(_load, read_a), partial(_load, read_b)
    # (side a, side b, bucket level, directory path); a side is a node, nothing, or a leaf item
    # seen as the listing of a directory that holds only its "." item.
    stack: list[tuple[_Side, _Side, int, str]] = []
    if root_a != root_b:
        stack.append((root_a, root_b, 0, ""))
    while stack:
        side_a, side_b, level, prefix = stack.pop()
        node_a, node_b = _open(load_a, side_a), _open(load_b, side_b)
        if isinstance(node_a, Buckets) and isinstance(node_b, Buckets):
            _check_level(level)
            pairs = zip(node_a.slots, node_b.slots, strict=True)
            stack.extend((a, b, level + 1, prefix) for a, b in pairs if a != b)
            continue
        items_a = {item.name: item for item in _expand(load_a, node_a, level)}
        items_b = {item.name: item for item in _expand(load_b, node_b, level)}
        for name in sorted(items_a.keys() | items_b.keys()):
            item_a, item_b = items_a.get(name), items_b.get(name)
            if item_a == item_b:
                continue
            path = _child_path(prefix, name)
            if (item_a is None or not item_a.subtree) and (item_b is None or not item_b.subtree):
                yield path
            else:  # a leaf against a subtree meets the subtree's "."; the rest is one-sided
                stack.append((_as_side(item_a), _as_side(item_b), 0, path))


def reachable(read: NodeReader, root: Hash) -> Iterator[Hash]:
    """Every node hash of the tree under `root`, each once (EMPTY_ROOT excluded)."""
    if root == EMPTY_ROOT:
        return
    seen, stack = {root}, [root]
    while stack:
        current = stack.pop()
        yield current
        node = _load(read, current)
        below = (
            node.slots if isinstance(node, Buckets) else [i.hash for i in node.items if i.subtree]
        )
        for child in below:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


class PullWalk:
    """A level-by-level diff against a tree whose nodes arrive in batches from a peer.

    Each round, `needed()` names the remote nodes to fetch (one request per tree level) and
    `advance()` takes them. `found` collects the paths whose remote leaf differs from the local
    one (new or changed there); paths only the local tree has are the peer's to pull. Remote
    bytes are checked against their hash and decoded strictly.
    """

    def __init__(self, read_local: NodeReader, local_root: Hash, remote_root: Hash) -> None:
        self._load_local = partial(_load, read_local)
        self._frontier: list[tuple[_Side, Hash, int, str]] = (
            [] if local_root == remote_root else [(local_root, remote_root, 0, "")]
        )
        self.found: list[tuple[str, Hash]] = []
        self.nodes_fetched = 0

    @property
    def done(self) -> bool:
        return not self._frontier

    def needed(self) -> list[Hash]:
        wanted = dict.fromkeys(remote for _, remote, _, _ in self._frontier)
        wanted.pop(EMPTY_ROOT, None)
        return list(wanted)

    def advance(self, nodes: Mapping[Hash, bytes]) -> None:
        """Expand the frontier with fetched nodes; KeyError if one the walk needs is absent."""
        frontier, self._frontier = self._frontier, []
        for local_side, remote_hash, level, prefix in frontier:
            remote = _load(nodes.__getitem__, remote_hash)
            self.nodes_fetched += 1
            local = _open(self._load_local, local_side)
            if isinstance(remote, Buckets):
                self._split(local, remote, level, prefix)
                continue
            mine = {item.name: item for item in _expand(self._load_local, local, level)}
            for item in remote.items:
                own = mine.get(item.name)
                if own == item:
                    continue
                if is_reserved(item.name):  # at any depth, in any case: never from a peer
                    raise DecodeError(f"the tree holds the reserved name {item.name!r}")
                path = _child_path(prefix, item.name)
                if item.subtree:
                    self._frontier.append((_as_side(own), item.hash, 0, path))
                elif own is not None and own.subtree:  # remote leaf, local directory: its "."
                    dot = _find(self._load_local, own.hash, DOT)
                    if dot is None or dot.hash != item.hash:
                        self.found.append((path, item.hash))
                else:
                    self.found.append((path, item.hash))

    def _split(self, local: Listing | Buckets, remote: Buckets, level: int, prefix: str) -> None:
        _check_level(level)
        if isinstance(local, Buckets):
            for own, theirs in zip(local.slots, remote.slots, strict=True):
                if theirs is not None and theirs != own:
                    self._frontier.append((own, theirs, level + 1, prefix))
            return
        shares: list[list[Item]] = [[] for _ in range(FANOUT)]
        for item in local.items:  # a local listing meets each remote bucket with its share
            shares[_nibble(_name_hash(item.name), level)].append(item)
        for slot, theirs in enumerate(remote.slots):
            if theirs is not None:
                share = Listing(tuple(shares[slot])) if shares[slot] else None
                self._frontier.append((share, theirs, level + 1, prefix))


# --- helpers -------------------------------------------------------------------------------------

_Loader = Callable[[Hash], Listing | Buckets]
_Transform = Callable[[Item | None], Item | None]  # old item of a name -> its new item
_Side = Hash | Listing | None  # one side of a diff step: a node, nothing, or a virtual listing


def _open(load: _Loader, side: _Side) -> Listing | Buckets:
    if side is None:
        return _EMPTY
    return side if isinstance(side, Listing) else load(side)


def _as_side(item: Item | None) -> _Side:
    if item is None or item.subtree:
        return None if item is None else item.hash
    return Listing((Item(DOT, False, item.hash),))


def _check_hash(value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"a hash is {HASH_SIZE} bytes")


def _node_from(obj: object) -> Listing | Buckets:
    # Loose on purpose where the re-encoding check is exact (False or 0.0 match 0 here).
    match obj:
        case [0, list(items)]:
            return Listing(tuple(_item_from(raw) for raw in items))
        case [1, int(count), list(slots)]:
            return Buckets(count, tuple(slots))
    raise ValueError("not a tagged listing or buckets array")


def _item_from(raw: object) -> Item:
    match raw:
        case [str(name), 0 | 1 as subtree, bytes(digest)]:
            return Item(name, bool(subtree), Hash(digest))
    raise ValueError("an item is [name, 0|1, hash]")


def _no_reader(node: Hash) -> bytes:
    raise KeyError(node)


def _load(read: NodeReader, node: Hash) -> Listing | Buckets:
    if node == EMPTY_ROOT:
        return _EMPTY
    data = read(node)
    if node_hash(data) != node:
        raise DecodeError(f"node {node.hex()[:16]} was read with bytes of another hash")
    return decode_node(data)


def _name_hash(name: str) -> bytes:
    return hash_bytes("bucket", name.encode())


def _check_level(level: int) -> None:
    if level >= _MAX_LEVEL:
        raise DecodeError("bucket nodes nested deeper than the name hash has nibbles")


def _nibble(name_hash: bytes, level: int) -> int:
    _check_level(level)
    byte = name_hash[level >> 1]
    return byte & 0x0F if level & 1 else byte >> 4


def _child_path(prefix: str, name: str) -> str:
    """The path of item `name` in directory `prefix`, refusing what no valid tree can hold."""
    if name == DOT:
        if not prefix:
            raise DecodeError('the root directory has a "." item')
        return prefix
    if not prefix and name == RESERVED_DIR:
        raise DecodeError(f"the tree holds the reserved {RESERVED_DIR}/ directory")
    path = f"{prefix}/{name}" if prefix else name
    if len(path) > MAX_PATH_BYTES // 4 and len(path.encode()) > MAX_PATH_BYTES:
        raise DecodeError(f"tree path longer than {MAX_PATH_BYTES} bytes")
    return path


def _find(load: _Loader, directory: Hash, name: str) -> Item | None:
    """The item `name` of a directory node, reading only the bucket path to it."""
    name_hash, node, level = _name_hash(name), load(directory), 0
    while isinstance(node, Buckets):
        slot = node.slots[_nibble(name_hash, level)]
        if slot is None:
            return None
        node, level = load(slot), level + 1
    return next((item for item in node.items if item.name == name), None)


def _expand(load: _Loader, node: Listing | Buckets, level: int) -> list[Item]:
    """Every item of a directory node (or of one of its buckets at `level`)."""
    if isinstance(node, Listing):
        return list(node.items)
    _check_level(level)
    return [
        item
        for slot in node.slots
        if slot is not None
        for item in _expand(load, load(slot), level + 1)
    ]


def _sorted_children(load: _Loader, directory: Hash, prefix: str) -> list[tuple[str, Item]]:
    """A directory's items as (path, item), "." first then by name, reversed for a stack."""
    items = sorted(_expand(load, load(directory), 0), key=lambda i: (i.name != DOT, i.name))
    return [(_child_path(prefix, item.name), item) for item in reversed(items)]


@dataclass(frozen=True, slots=True)
class _Big:
    """A written Buckets node (more than LISTING_MAX items)."""

    hash: Hash
    count: int


# A changed directory part: its items (at most LISTING_MAX, not written yet, so that a parent
# Buckets node that shrinks can absorb them) or a written Buckets node.
_Part = dict[str, Item] | _Big


def _set_leaf(name: str, leaf: Hash | None) -> _Transform:
    return lambda _old: None if leaf is None else Item(name, False, leaf)


def _constant(item: Item | None) -> _Transform:
    return lambda _old: item


@dataclass(slots=True)
class _Batch:
    """One update: the old nodes it read (cached, so each is read once) and the nodes it wrote.

    Every leaf hash covers its full path, so every node is unique to its position in the tree: an
    old node that this batch read and did not write again is referenced from nowhere else in the
    new tree, and is unreachable.
    """

    read: NodeReader
    old: dict[Hash, Listing | Buckets] = field(default_factory=dict)
    new: dict[Hash, bytes] = field(default_factory=dict)
    name_hashes: dict[str, bytes] = field(default_factory=dict)

    def run(self, root: Hash, touched: dict[str, Hash | None], dirs: dict[str, set[str]]) -> Hash:
        order = sorted(dirs, key=lambda d: d.count("/") + 1 if d else 0)
        old_items: dict[str, Item | None] = {}  # each changed directory's item in its parent

        def old_dir(directory: str) -> Hash | None:
            if not directory:
                return None if root == EMPTY_ROOT else root
            item = old_items[directory]
            return item.hash if item is not None and item.subtree else None

        for directory in order[1:]:  # top-down: the old item of every changed directory
            parent, name = _split(directory)
            parent_node = old_dir(parent)
            old_items[directory] = (
                None if parent_node is None else _find(self.load, parent_node, name)
            )
        new_items: dict[str, Item | None] = {}
        for directory in reversed(order):  # bottom-up: rewrite each changed directory once
            todo: dict[str, _Transform] = {}
            for name in dirs[directory]:
                path = f"{directory}/{name}" if directory else name
                todo[name] = (
                    _constant(new_items[path]) if path in dirs else self.leaf(name, touched[path])
                )
            old = old_items.get(directory)
            if directory in touched:
                todo[DOT] = _set_leaf(DOT, touched[directory])
            elif old is not None and not old.subtree:  # a leaf that now gets children
                todo[DOT] = _set_leaf(DOT, old.hash)
            part, _ = self.part(old_dir(directory), 0, todo)
            if not directory:
                return self.write(part, 0) or EMPTY_ROOT
            new_items[directory] = self.dir_item(_split(directory)[1], part)
        raise AssertionError("the root is always a changed directory")

    def load(self, node: Hash) -> Listing | Buckets:
        if node not in self.old:
            self.old[node] = _load(self.read, node)
        return self.old[node]

    def nibble(self, name: str, level: int) -> int:
        name_hash = self.name_hashes.get(name)
        if name_hash is None:
            name_hash = self.name_hashes[name] = _name_hash(name)
        return _nibble(name_hash, level)

    def leaf(self, name: str, leaf: Hash | None) -> _Transform:
        """The transform of a path whose own leaf changes and that has no changes below it."""

        def apply(old: Item | None) -> Item | None:
            if old is not None and old.subtree:
                part, _ = self.part(old.hash, 0, {DOT: _set_leaf(DOT, leaf)})
                return self.dir_item(name, part)
            return None if leaf is None else Item(name, False, leaf)

        return apply

    def dir_item(self, name: str, part: _Part) -> Item | None:
        """A directory's item in its parent: gone if empty, a leaf if it holds only "."."""
        if isinstance(part, dict) and part.keys() <= {DOT}:
            return Item(name, False, part[DOT].hash) if part else None
        node = self.write(part, 0)
        assert node is not None
        return Item(name, True, node)

    def part(self, node: Hash | None, level: int, todo: dict[str, _Transform]) -> tuple[_Part, int]:
        """Apply `todo` to the directory part `node` at bucket `level`: (new part, old count)."""
        old = _EMPTY if node is None else self.load(node)
        if isinstance(old, Listing):
            items = {item.name: item for item in old.items}
            for name, transform in todo.items():
                item = transform(items.pop(name, None))
                if item is not None:
                    items[name] = item
            if len(items) > LISTING_MAX:
                return _Big(self.grow(items, level), len(items)), len(old.items)
            return items, len(old.items)
        groups: dict[int, dict[str, _Transform]] = {}
        for name, transform in todo.items():
            groups.setdefault(self.nibble(name, level), {})[name] = transform
        parts: dict[int, _Part] = {}
        count = old.count
        for slot, group in groups.items():
            parts[slot], old_count = self.part(old.slots[slot], level + 1, group)
            count += _size(parts[slot]) - old_count
        if count > LISTING_MAX:
            slots = [
                self.write(parts[i], level + 1) if i in parts else s
                for i, s in enumerate(old.slots)
            ]
            return _Big(self.put(Buckets(count, tuple(slots))), count), old.count
        merged: dict[str, Item] = {}  # collapse: this node and all below it become one part
        for slot, child in enumerate(old.slots):
            if slot in parts:
                small = parts[slot]
                assert isinstance(small, dict)
                merged |= small
            elif child is not None:
                merged |= {i.name: i for i in _expand(self.load, self.load(child), level + 1)}
        return merged, old.count

    def write(self, part: _Part, level: int) -> Hash | None:
        """The node of a part at bucket `level`, written; None if the part is empty."""
        if isinstance(part, _Big):
            return part.hash
        if len(part) > LISTING_MAX:
            return self.grow(part, level)
        return self.put(Listing(tuple(part[name] for name in sorted(part)))) if part else None

    def grow(self, items: dict[str, Item], level: int) -> Hash:
        """Write the canonical Buckets node of more than LISTING_MAX items, and all below it."""
        groups: list[dict[str, Item]] = [{} for _ in range(FANOUT)]
        for name, item in items.items():
            groups[self.nibble(name, level)][name] = item
        slots = tuple(self.write(group, level + 1) for group in groups)
        return self.put(Buckets(len(items), slots))

    def put(self, node: Listing | Buckets) -> Hash:
        data = encode_node(node)
        digest = node_hash(data)
        self.new[digest] = data
        return digest


def _size(part: _Part) -> int:
    return len(part) if isinstance(part, dict) else part.count


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name
