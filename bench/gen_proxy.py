"""Does any cheap measurement predict HumanEval? Teacher-forced agreement on the dense model's own code.

Held-out perplexity does not rank quantized variants by HumanEval (humaneval_seeds.json: four GPTQ seeds at ppl
7.240-7.269 pass 60-67 of 164). Greedy HumanEval fails when the student's greedy path leaves the teacher's, so
this measures exactly that, without generating from the student: the dense teacher completes ``--n-prompts``
docstring prompts mined from installed packages (sources.instructions: never the stdlib held-out files, never
HumanEval), and each candidate reads prompt + teacher completion in one forward pass. Per candidate: the mean
NLL of the teacher's tokens, the top-1 agreement (student argmax == teacher token), and the share of each
completion before the first disagreement (how far greedy decoding would follow the teacher). With
``--humaneval NAME=DIR`` pairs, the Spearman correlation of each measure with the candidates' HumanEval passes.

Run: flock /tmp/heavy.lock .venv/bin/python bench/gen_proxy.py --teacher qwen2.5-coder-0.5b \\
         --candidate s0=DIR --humaneval s0=HE_DIR ... [--n-prompts 96] [--name gen_proxy]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, merge_records, write_results  # noqa: I001  (bench/ is on sys.path)

from artifacts import write_json_atomic
from evaluation.generate import GenerationConfig, generate_completions
from sources import load_model
from sources.compute import autocast, compute_dtype
from sources.instructions import InstructionConfig, build_instructions

CACHE = Path("/tmp/lord-gen-proxy")
_SIG = re.compile(r"with this signature:\n(?P<sig>.+?)\n\nIt should do the following:\n(?P<doc>.+)\Z", re.S)


def code_prompts(n: int, seed: int) -> dict[str, str]:
    """HumanEval-shaped prompts (signature, docstring, the body's indent left to the model) from mined pairs."""
    recs = build_instructions(InstructionConfig(max_examples=4 * n, seed=seed)).records
    prompts: dict[str, str] = {}
    for i, r in enumerate(recs):
        m = _SIG.search(r["instruction"])
        if m is None or not m["sig"].startswith("def ") or not m["sig"].rstrip().endswith(":"):
            continue
        lines = m["doc"].strip().replace('"""', "'''").splitlines()
        doc = "\n    ".join(line.strip() for line in lines)
        prompts[f"mined/{i}"] = f'{m["sig"].rstrip()}\n    """{doc}\n    """\n'
        if len(prompts) == n:
            break
    return prompts


def teacher_completions(teacher: str, prompts: dict[str, str], max_new: int) -> dict[str, str]:
    key = hashlib.sha256(json.dumps([teacher, prompts, max_new], sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"teacher-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = load_model(teacher)
    cfg = GenerationConfig(max_new_tokens=max_new, batch_size=16)
    with autocast("cpu", compute_dtype("cpu")):
        recs = generate_completions(model, tok, prompts, cfg, progress=True)
    out = {r["task_id"]: r["completion"] for r in recs if r["completion"].strip()}
    write_json_atomic(path, out)  # a killed run never leaves a half-written cache entry
    return out


@torch.no_grad()
def agreement(model_dir: str, prompts: dict[str, str], completions: dict[str, str]) -> dict[str, float]:
    model, tok = load_model(model_dir)
    nll, agree, n_tok, follow = 0.0, 0, 0, []
    with autocast("cpu", compute_dtype("cpu")):
        for task, completion in completions.items():
            p_ids = tok(prompts[task])["input_ids"]
            ids = tok(prompts[task] + completion)["input_ids"]
            k = len(p_ids)
            if ids[:k] != p_ids or len(ids) <= k:  # the prompt's last token merged into the completion: skip
                continue
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, k - 1:-1].float()
            target = torch.tensor(ids[k:])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            hit = logits.argmax(-1) == target
            agree += int(hit.sum())
            n_tok += len(target)
            miss = (~hit).nonzero()
            follow.append((int(miss[0]) if len(miss) else len(target)) / len(target))
    return {"teacher_nll": round(nll / n_tok, 5), "top1_agreement": round(agree / n_tok, 5),
            "followed_share": round(sum(follow) / len(follow), 5), "n_completions": len(follow), "n_tokens": n_tok}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    ap.add_argument("--candidate", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--humaneval", nargs="*", default=[], metavar="NAME=HE_DIR", help="lord eval --humaneval dirs")
    ap.add_argument("--n-prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="gen_proxy")
    ap.add_argument("--merge", action="store_true", help="add to bench/results/<name>.json (same teacher and "
                                                         "prompts) instead of replacing it; correlations over all")
    args = ap.parse_args()
    t0 = time.perf_counter()
    prompts = code_prompts(args.n_prompts, args.seed)
    completions = teacher_completions(args.teacher, prompts, args.max_new_tokens)
    print(f"{len(completions)} teacher completions in {time.perf_counter() - t0:.0f} s")
    passed = {}
    for pair in args.humaneval:
        name, d = pair.split("=", 1)
        passed[name] = json.loads((Path(d) / "humaneval" / "metrics.json").read_text())["n_passed"]
    records: list[dict[str, Any]] = []
    for pair in args.candidate:
        name, d = pair.split("=", 1)
        t = time.perf_counter()
        rec = {"variant": name, "model": d, **agreement(d, prompts, completions),
               "humaneval_passed": passed.get(name), "seconds": round(time.perf_counter() - t, 1)}
        print(rec)
        records.append(rec)
    merged = records
    if args.merge and (RESULTS / f"{args.name}.json").is_file():
        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        if (old["protocol"]["teacher"], old["protocol"]["n_prompts"], old["protocol"]["seed"]) != \
                (args.teacher, args.n_prompts, args.seed):
            raise SystemExit(f"{args.name}.json was measured with another teacher or prompt set; not merged")
        new = {r["variant"] for r in records}
        merged = [r for r in old["records"] if r["variant"] not in new] + records
    # the dense teacher itself would make any measure look predictive: correlate over compressed models only
    scored = [r for r in merged if r["humaneval_passed"] is not None and r["variant"] != "dense"]
    corr = {}
    if len(scored) >= 3:
        he = [float(r["humaneval_passed"]) for r in scored]
        for key in ("teacher_nll", "top1_agreement", "followed_share"):
            sign = -1.0 if key == "teacher_nll" else 1.0  # lower NLL should mean more passes
            corr[f"spearman_{key}_vs_humaneval"] = round(sign * spearman([r[key] for r in scored], he), 3)
        print(corr)
    protocol = {"teacher": args.teacher, "n_prompts": args.n_prompts, "seed": args.seed,
                              "max_new_tokens": args.max_new_tokens,
                              "prompts": "sources.instructions docstring prompts (installed packages; not stdlib, "
                                         "not HumanEval), signature + docstring as code",
                              "correlation": "Spearman over the compressed candidates with a HumanEval run (the "
                                             "dense teacher left out); the NLL's sign flipped so that +1 = the "
                                             "measure ranks candidates as HumanEval does",
                              "n_correlated": len(scored),
                              **corr}
    if args.merge:
        merge_records(args.name, records, protocol, key=("variant",))
    else:
        write_results(args.name, protocol, records)


if __name__ == "__main__":
    main()
