"""Run one fine-tuning configuration in a fresh Python process, so its peak memory is its own.

``python -m finetune.isolated MODEL OUT_DIR CONFIG_JSON`` runs ``finetune_to_dir`` and leaves the metrics in
``OUT_DIR/metrics.json``; ``finetune_in_subprocess`` is the library face used by benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import FinetuneConfig
from .errors import FinetuneError


def finetune_in_subprocess(model: str, cfg: FinetuneConfig, out_dir: Path, threads: int | None = None,
                           progress: bool = True) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "finetune.isolated", str(model), str(out_dir), json.dumps(cfg.to_dict())]
    if not progress:
        cmd.append("--quiet")
    proc = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        raise FinetuneError(f"fine-tuning {model} in a subprocess failed (exit {proc.returncode}):\n{tail}")
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    import torch

    from .stage import finetune_to_dir

    args = list(sys.argv[1:] if argv is None else argv)
    quiet = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    if len(args) != 3:
        print("usage: python -m finetune.isolated MODEL OUT_DIR CONFIG_JSON [--quiet]", file=sys.stderr)
        return 2
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = FinetuneConfig(**json.loads(args[2]))
    finetune_to_dir(args[0], cfg, Path(args[1]), progress=not quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
