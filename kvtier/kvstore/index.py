"""The prefix index: one node per cached chunk, linked to its parent, across all tiers.

A node records which tiers hold its chunk (a bit per tier), how many users pin it, its depth in the prompt,
its namespace and its turn (how many earlier prompts the prompts that used it continue). Invariants the
store keeps:

- a node's parent is cached whenever the node is (no orphans): a chunk leaves the store only when it has no
  children, and deleting a chunk deletes its whole subtree;
- a pinned node (``pins > 0``: an explicit pin, or a fetch in flight) is never evicted nor deleted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class Node:
    """One cached chunk. ``tiers``: bit ``i`` set when tier ``i`` holds it; ``turn``: see
    :meth:`kvtier.kvstore.store.TieredStore.turn_of`."""

    __slots__ = ("key", "parent", "children", "tiers", "depth", "pins", "namespace", "layout", "turn")

    def __init__(self, key: bytes, parent: "Node | None", depth: int, namespace: str, layout: str) -> None:
        self.key = key
        self.parent = parent
        self.children: list[Node] | None = None
        self.tiers = 0
        self.depth = depth
        self.pins = 0
        self.namespace = namespace
        self.layout = layout
        self.turn = 0

    def has_children_in(self, mask: int) -> bool:
        """True when a child is held by any tier in ``mask``."""
        return bool(self.children) and any(c.tiers & mask for c in self.children)

    def __repr__(self) -> str:
        return f"Node({self.key.hex()[:8]}, depth={self.depth}, tiers={self.tiers:b}, pins={self.pins})"


class PrefixIndex:
    """Maps chunk keys to nodes; longest-prefix matching over chained keys."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Node] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, key: bytes) -> bool:
        return key in self.nodes

    def get(self, key: bytes) -> Node | None:
        return self.nodes.get(key)

    def match(self, keys: Sequence[bytes]) -> list[Node]:
        """Nodes of the longest leading run of ``keys`` that is cached (in any tier)."""
        out = []
        nodes = self.nodes
        for key in keys:
            node = nodes.get(key)
            if node is None:
                break
            out.append(node)
        return out

    def add(self, key: bytes, parent: Node | None, namespace: str, layout: str) -> Node:
        """Add a node under ``parent`` (None for a prompt's first chunk); returns the existing one if present."""
        node = self.nodes.get(key)
        if node is not None:
            return node
        node = Node(key, parent, 0 if parent is None else parent.depth + 1, namespace, layout)
        self.nodes[key] = node
        if parent is not None:
            if parent.children is None:
                parent.children = [node]
            else:
                parent.children.append(node)
        return node

    def remove(self, node: Node) -> None:
        """Drop a childless node."""
        if node.children:
            raise RuntimeError(f"{node} still has children; remove them first")
        del self.nodes[node.key]
        parent = node.parent
        if parent is not None and parent.children is not None:
            parent.children.remove(node)
            if not parent.children:
                parent.children = None

    @staticmethod
    def subtree(node: Node) -> Iterator[Node]:
        """``node`` and all its descendants, children before parents."""
        stack: list[tuple[Node, bool]] = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if expanded or not current.children:
                yield current
            else:
                stack.append((current, True))
                stack.extend((c, False) for c in current.children)
