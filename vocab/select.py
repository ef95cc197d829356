"""Which token ids to keep: the required base plus the most used tokens, closed over merges.

A token kept as the result of a merge needs both parents kept (recursively), otherwise BPE could never
build it; so each candidate is added together with its not-yet-kept ancestors, as one unit. Candidates are
ranked by corpus count, ties by original id (a lower BPE id was merged earlier in pretraining, i.e. more
frequent there), so a ``keep`` larger than the tokens the corpus uses still keeps the likeliest ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from vocab.errors import VocabError


def select_tokens(counts: Sequence[int], required: set[int], parents: dict[int, list[tuple[int, int]]],
                  keep: int | None = None, coverage: float | None = None) -> list[int]:
    """Sorted original ids to keep: ``required`` (with ancestors), then by count until ``keep`` ids in
    total, or until the kept ids cover ``coverage`` of all counted occurrences."""
    if (keep is None) == (coverage is None):
        raise VocabError(f"select_tokens needs exactly one of keep/coverage (got {keep}, {coverage})")
    kept: set[int] = set()
    for t in sorted(required):
        kept.update(_closure(t, kept, parents))
    if keep is not None and keep < len(kept):
        raise VocabError(f"keep={keep} is below the {len(kept)} tokens every trim needs (256 byte symbols, "
                         f"special/added and chat-template tokens, and their merge parents); use "
                         f"keep >= {len(kept)}")
    n = len(counts)
    order = sorted(range(n), key=lambda i: (-counts[i], i))
    if coverage is not None:
        total = sum(counts)
        covered = sum(counts[i] for i in kept)
        for t in order:
            if covered >= coverage * total:
                break
            new = _closure(t, kept, parents)
            kept.update(new)
            covered += sum(counts[i] for i in new)
        return sorted(kept)
    for t in order:
        if len(kept) >= keep:
            break
        new = _closure(t, kept, parents)
        if len(kept) + len(new) <= keep:
            kept.update(new)
    return sorted(kept)


def _closure(token: int, kept: set[int], parents: dict[int, list[tuple[int, int]]]) -> set[int]:
    """``token`` and every merge ancestor not yet in ``kept`` (iterative: merge chains run deep)."""
    new: set[int] = set()
    stack = [token]
    while stack:
        t = stack.pop()
        if t in kept or t in new:
            continue
        new.add(t)
        for a, b in parents.get(t, ()):
            stack.extend((a, b))
    return new
