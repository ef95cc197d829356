"""The ``vocab`` stage config (frozen, validated at the edge, logged as params by flows/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vocab.errors import VocabError


@dataclass(frozen=True)
class VocabConfig:
    """How many tokens to keep: exactly one of ``keep`` (total vocabulary size after trimming, base bytes,
    special tokens and merge intermediates included) or ``coverage`` (keep the most used tokens until they
    cover this fraction of the corpus's token occurrences, then add what they need).

    ``corpus``: a directory of ``.py`` files to count token use on (all of them); default the calibration
    split of ``sources.corpus.code_split()`` so the held-out split stays unseen. ``max_files`` caps the
    number of files counted (``None``: all). ``packages``: installed Python packages whose code is counted too,
    up to ``package_kb`` of each (files in a fixed path-hash order). Why: a code model meets more than the stdlib;
    counted on the stdlib's calibration split alone, keep=65536 cost +7.3% bits/byte on another project's code and
    +5.1% on HumanEval's text while the stdlib held-out saw +0.45% (bench/results/domain_ppl.json).
    """

    keep: int | None = None
    coverage: float | None = None
    corpus: str | None = None
    max_files: int | None = None
    packages: tuple[str, ...] = ()
    package_kb: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.packages, (list, str)):  # from JSON / CLI
            object.__setattr__(self, "packages", (self.packages,) if isinstance(self.packages, str)
                               else tuple(self.packages))
        if not isinstance(self.package_kb, int) or self.package_kb < 1:
            raise VocabError(f"package_kb={self.package_kb!r} must be a positive number of KB per package")
        if (self.keep is None) == (self.coverage is None):
            raise VocabError(f"give exactly one of keep (a vocabulary size, e.g. 32768) or coverage (a fraction "
                             f"of corpus tokens, e.g. 0.999); got keep={self.keep}, coverage={self.coverage}")
        if self.keep is not None and (not isinstance(self.keep, int) or self.keep < 1):
            raise VocabError(f"keep={self.keep!r} must be a positive integer vocabulary size, e.g. 32768")
        if self.coverage is not None and not 0.0 < float(self.coverage) <= 1.0:
            raise VocabError(f"coverage={self.coverage!r} must be a fraction in (0, 1], e.g. 0.999")
        if self.max_files is not None and self.max_files < 1:
            raise VocabError(f"max_files={self.max_files} must be >= 1 (or None for every file)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
