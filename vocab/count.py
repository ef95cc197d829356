"""Token use over a code corpus: how often each id of the *original* tokenizer occurs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vocab.errors import VocabError

# an empty conversation rendered through the chat template: its tokens (role names, separators, a default
# system prompt) are always kept, so chat prompts tokenize exactly as before
CHAT_PROBE = [{"role": "system", "content": ""}, {"role": "user", "content": ""},
              {"role": "assistant", "content": ""}]


def corpus_files(corpus: str | Path | None, max_files: int | None = None) -> list[Path]:
    """``.py`` files to count on: every file under ``corpus`` (recursive), or the calibration split of the
    default code corpus, so the held-out split used for evaluation is never seen."""
    from sources.corpus import is_mix

    if corpus is None or is_mix(corpus):  # the stdlib or a mix ("stdlib,pkg:numpy"): its calibration split
        from sources import code_split

        files = list(code_split(corpus).calibration)
    else:
        root = Path(corpus).expanduser()
        if not root.is_dir():
            raise VocabError(f"--corpus {corpus!r} is not a directory; pass a directory of .py files")
        files = sorted(p for p in root.rglob("*.py") if p.is_file())
        if not files:
            raise VocabError(f"--corpus {corpus!r} holds no .py files to count token use on")
    return files[:max_files] if max_files else files


def package_files(packages: tuple[str, ...], max_kb: int) -> list[Path]:
    """Up to ``max_kb`` of ``.py`` files from each installed package (``sources.corpus.sample_files``)."""
    from sources.corpus import sample_files
    from sources.instructions import package_root

    files: list[Path] = []
    for name in packages:
        root = package_root(name)
        if root is None:
            raise VocabError(f"package {name!r} is not installed (or is a single module); the vocab corpus counts "
                             f"token use on installed packages' code: install it or drop it from packages")
        files.extend(sample_files(root, max_kb))
    return files


def count_token_use(tokenizer: Any, files: list[Path], n_ids: int) -> list[int]:
    """Occurrences of each original id in ``files`` (tokenized as evaluation does: no special tokens)."""
    from sources.corpus import token_stream

    ids = token_stream(tokenizer, files)
    if ids.numel() and int(ids.max()) >= n_ids:
        raise VocabError(f"the tokenizer produced id {int(ids.max())} but its tokenizer.json has {n_ids} ids; "
                         f"the tokenizer files are inconsistent")
    return torch.bincount(ids, minlength=n_ids).tolist()


def chat_template_ids(tokenizer: Any) -> set[int]:
    """Ids of a conversation rendered through the tokenizer's chat template (empty if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    ids: set[int] = set()
    for messages in (CHAT_PROBE, CHAT_PROBE[1:]):  # with and without a system turn (a default one may render)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids
