"""Real English text available offline: Python's own documentation topics (``pydoc_data.topics``).

The 79 topics are split deterministically in two halves so that text used to tune anything (head search,
thresholds) never overlaps the held-out text used to measure quality.
"""

from __future__ import annotations

from typing import Literal


def english_text(split: Literal["tune", "heldout", "all"] = "heldout") -> str:
    """About 230 KB of prose for ``tune`` or ``heldout`` (alternate topics in sorted order), 465 KB for ``all``."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split == "tune":
        names = names[0::2]
    elif split == "heldout":
        names = names[1::2]
    elif split != "all":
        raise ValueError(f"split must be 'tune', 'heldout' or 'all', got {split!r}")
    return "\n\n".join(topics[name] for name in names)
