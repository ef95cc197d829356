"""Interop check: our GPTQ v1 checkpoints loaded by GPTQModel 7.6.0 and by transformers give our weights and
logits. Dense checkpoints load through ``GPTQModel.load``; LoRD-factored ones through quant/gptqmodel_lord.py (a
GPTQModel model definition over our factored modules; transformers cannot build those without our class).

GPTQModel's CPU kernel (BACKEND.TORCH) runs in bfloat16 or float16 only, so the logits are compared with our
loader in bfloat16 too, next to the bf16-vs-fp32 difference of our own model as the noise floor; the
dequantized weights are compared directly (their bf16 scales are the only rounding).

GPTQModel needs numpy 2.2 and would change the project venv, so this runs from a side venv that sees the
project's packages (shared/STACK.md: 7.6.0 works on CPU with GPTQMODEL_CPU_WORKERS=2):

    python3.11 -m venv /tmp/gvenv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/gvenv/lib/python3.11/site-packages/main.pth
    /tmp/gvenv/bin/pip install --no-deps gptqmodel==7.6.0 Defuser Device-SMI LogBar PyPcre TokeNicer torchao==0.18.0 optimum
    GPTQMODEL_CPU_WORKERS=2 flock /tmp/heavy.lock /tmp/gvenv/bin/python bench/quant_interop.py

Existing checkpoints (quantizing the 0.5B takes minutes) are compared with ``--checkpoint CASE=DIR ...``; their
QuantConfig and factored flag come from the dir's quant_layout.json and ``--model`` is only the records' label:

    /tmp/gvenv/bin/python bench/quant_interop.py --model qwen2.5-coder-0.5b-vocab65536 \
        --checkpoint dense_4bit_g128=runs/quantize/<dense> lord2.5_4bit_g128=runs/quantize/<lord>
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(k, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import merge_records  # noqa: E402

from quant import QuantConfig, QuantLinear, load_quantized, quantize_to_dir  # noqa: E402
from sources import code_split, token_stream  # noqa: E402

TINY = "tiny-random-llama"  # random weights, SmolLM2's tokenizer and vocab: a light run when the CPU is busy
CASES = {
    "4bit_g128_sym": QuantConfig(bits=4, group_size=128, n_seqs=8, seq_len=256),
    "4bit_g128_actorder_asym": QuantConfig(bits=4, group_size=128, act_order=True, sym=False, n_seqs=8, seq_len=256),
    "8bit_perchannel": QuantConfig(bits=8, group_size=-1, n_seqs=8, seq_len=256),
}
# LoRD-factored tiny model (GPTQModel only, through quant/gptqmodel_lord.py): rank 100 (not a multiple of the
# packing word or the group), layer 1 partly factored (q_proj and o_proj dense, k/v share their own down), and
# per-factor widths (8-bit down, 4-bit up: GPTQModel's `dynamic` overrides)
TINY_LORD_CASES = {
    "lord_4bit_g128": QuantConfig(bits=4, group_size=128, n_seqs=8, seq_len=256),
    "lord_down8_up4_g128": QuantConfig(bits=4, down_bits=8, group_size=128, n_seqs=8, seq_len=256),
}
TINY_RANK = 100


def tiny_lord_groups() -> dict[str, dict]:
    full = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
            "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
    partial = {"kv": ["self_attn.k_proj", "self_attn.v_proj"], "gate_up": full["gate_up"], "down": full["down"]}
    return {f"model.layers.{i}.{g}": {"members": [f"model.layers.{i}.{m}" for m in ms], "rank": TINY_RANK}
            for i, plan in enumerate((full, partial)) for g, ms in plan.items()}


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def weight_rel_err(theirs: torch.nn.Module, ours: dict[str, torch.nn.Module]) -> tuple[float, int]:
    """Worst per-layer max|W_theirs - W_ours| / max|W_ours| over the quantized linears both models hold."""
    worst, n = 0.0, 0
    for name, mod in theirs.named_modules():
        if name in ours and hasattr(mod, "dequantize_weight"):
            w = mod.dequantize_weight().float().T  # GPTQModel returns [in, out]
            wo = ours[name].dequantize()
            worst, n = max(worst, float((w - wo).abs().max() / wo.abs().max())), n + 1
    return worst, n


def load_gptqmodel(path: Path) -> torch.nn.Module:
    from gptqmodel import BACKEND, GPTQModel

    kwargs = {"device": "cpu", "backend": BACKEND.TORCH, "dtype": torch.bfloat16}
    if json.loads((Path(path) / "config.json").read_text()).get("lord"):
        from quant.gptqmodel_lord import load_lord_gptqmodel

        return load_lord_gptqmodel(path, **kwargs).model.eval()
    return GPTQModel.load(str(path), **kwargs).model.eval()


def load_transformers(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.bfloat16).eval()


def build_checkpoint(model: str, cfg: QuantConfig, out: Path, factored: bool = False) -> None:
    """Quantize ``model`` (a spec or a LoRD dir) into ``out``; TINY builds the random model (factored with
    ``tiny_lord_groups`` if asked) in memory first."""
    if model != TINY:
        quantize_to_dir(model, cfg, out)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from artifacts import atomic_dir
    from quant import quantize_model, save_quantized
    from sources import calibration_batches, resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).float().eval()
    if factored:
        from lord.modeling.modeling_lord import install_rank_map

        install_rank_map(m, tiny_lord_groups())  # fresh nn.Linear init: random factors, like the dense weights
        m.config.lord = {"groups": tiny_lord_groups()}
    ids = calibration_batches(tok, code_split().calibration, n_seqs=cfg.n_seqs, seq_len=cfg.seq_len)
    quantize_model(m, cfg, ids)
    with atomic_dir(out) as tmp:
        save_quantized(m, tok, tmp, cfg)


# The 0.5B (--real): GPTQ-4 g128 of the dense model, of its LoRD -10% (uniform) factorisation, and of that LoRD
# model with per-factor widths (h14-quant's down_bits: 8-bit bottleneck, 4-bit up), with a small calibration
# (interop checks the checkpoint format and kernels, not quantization quality: bench/quant.py measures that).
REAL_CASES = {
    "dense_4bit_g128": (False, QuantConfig(bits=4, group_size=128, n_seqs=4, seq_len=256)),
    "lord10_4bit_g128": (True, QuantConfig(bits=4, group_size=128, n_seqs=4, seq_len=256)),
    "lord10_down8_up4_g128": (True, QuantConfig(bits=4, down_bits=8, group_size=128, n_seqs=4, seq_len=256)),
}


def lord_base(model: str, work: Path) -> str:
    """A LoRD -10% (uniform plan) checkpoint of ``model``, built once per run."""
    from lord import CalibConfig, DecomposeConfig, collect_stats_to_file, decompose_to_dir

    out = work / "lord10"
    if not out.is_dir():
        stats = work / "stats.safetensors"
        collect_stats_to_file(model, stats, CalibConfig(n_seqs=16, seq_len=256))
        decompose_to_dir(model, stats, DecomposeConfig(plan="uniform", reduction=0.1), out)
    return str(out)


def existing_cases(specs: list[str]) -> dict[str, tuple[Path, QuantConfig, bool]]:
    """``CASE=DIR`` -> {case: (dir, its QuantConfig, factored)} read from each dir's quant_layout.json."""
    out = {}
    for spec in specs:
        case, sep, d = spec.partition("=")
        layout = Path(d) / "quant_layout.json"
        if not sep or not layout.is_file():
            raise SystemExit(f"--checkpoint {spec!r}: expected CASE=DIR with DIR a quant/ checkpoint "
                             "(holding quant_layout.json)")
        doc = json.loads(layout.read_text())
        out[case] = (Path(d), QuantConfig(**doc["config"]), bool(doc["factored"]))
    return out


def main() -> None:
    import argparse

    import gptqmodel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"a model spec, or {TINY} for a light run; with "
                    "--checkpoint only the label the records carry")
    ap.add_argument("--real", action="store_true", help="the REAL_CASES (dense, LoRD, mixed-width LoRD) on "
                    "--model, GPTQModel only; records of other models already in the results file are kept")
    ap.add_argument("--checkpoint", nargs="+", metavar="CASE=DIR", help="compare existing checkpoint dirs "
                    "(GPTQModel only, like --real) instead of quantizing; records are merged by model/case/loader")
    ap.add_argument("--cases", nargs="*", help="a subset of the cases (default: all of CASES or REAL_CASES)")
    ap.add_argument("--tokens", type=int, default=None, help="held-out tokens per logits comparison (default 2 x "
                    "256; --real / --checkpoint: 1 x 64, since GPTQModel's CPU kernel runs in bf16, ~30x slower "
                    "than float32 on a CPU without native bf16)")
    args = ap.parse_args()
    model_spec = args.model
    gptq_only = args.real or bool(args.checkpoint)
    n_tok = args.tokens or (64 if gptq_only else 512)
    if n_tok < 16 or (n_tok > 256 and n_tok % 256):
        raise SystemExit(f"--tokens {n_tok}: expected 16..256, or a multiple of 256 (rows of 256 tokens)")
    shape = (max(1, n_tok // 256), min(n_tok, 256))
    torch.manual_seed(0)
    split = code_split()
    records = []
    work = Path(tempfile.mkdtemp(prefix="quant-interop-"))
    if args.checkpoint:
        given = existing_cases(args.checkpoint)
        cases = {c: (None, cfg, factored, d) for c, (d, cfg, factored) in given.items()}
    else:
        chosen = REAL_CASES if args.real else {**CASES, **(TINY_LORD_CASES if model_spec == TINY else {})}
        unknown = set(args.cases or ()) - set(chosen)
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}; expected some of {sorted(chosen)}")
        chosen = {c: v for c, v in chosen.items() if not args.cases or c in args.cases}
        # case -> (source to quantize, its config, factored, checkpoint dir)
        cases = ({c: (lord_base(model_spec, work) if factored else model_spec, cfg, factored, work / c)
                  for c, (factored, cfg) in chosen.items()} if args.real
                 else {c: (model_spec, cfg, c in TINY_LORD_CASES, work / c) for c, cfg in chosen.items()})
    loaders = (("gptqmodel", load_gptqmodel),) if gptq_only else (("gptqmodel", load_gptqmodel),
                                                                  ("transformers", load_transformers))
    for case, (source, cfg, factored, out) in cases.items():
        if source is not None:
            build_checkpoint(source, cfg, out, factored and source == TINY)
        ours, tok = load_quantized(out)
        ids = token_stream(tok, split.heldout, max_tokens=shape[0] * shape[1]).view(*shape)
        ref32 = logits_of(ours, ids)
        qlins = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
        ours16, _ = load_quantized(out, dtype=torch.bfloat16)
        ref = logits_of(ours16, ids)
        noise = rel(ref, ref32)
        del ours16
        for loader_name, loader in loaders if not factored else loaders[:1]:  # transformers has no LoRD class
            rec = {"model": model_spec, "case": case, "loader": loader_name, "bits": cfg.bits,
                   "factored": factored, "down_bits": cfg.down_bits,
                   "group_size": cfg.group_size, "act_order": cfg.act_order, "sym": cfg.sym,
                   "ours_bf16_vs_fp32_logits_rel_err": round(noise, 5)}
            if source is None:
                rec["checkpoint"] = str(out)
            try:
                t0 = time.perf_counter()
                theirs = loader(out)
                rec["load_seconds"] = round(time.perf_counter() - t0, 1)
                w_err, n_layers = weight_rel_err(theirs, qlins)
                other = logits_of(theirs, ids)
                rec.update({"weight_max_rel_err": round(w_err, 5), "n_layers_compared": n_layers,
                            "n_layers_ours": len(qlins),
                            "logits_rel_err_vs_ours_bf16": round(rel(other, ref), 5),
                            "argmax_agreement": float((other.argmax(-1) == ref.argmax(-1)).float().mean())})
                rec["ok"] = w_err < 1e-2 and n_layers == len(qlins) and rec["logits_rel_err_vs_ours_bf16"] < 3 * noise
            except Exception as e:  # record why a loader refused, do not hide it
                rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
                traceback.print_exc()
            print(rec, flush=True)
            records.append(rec)
            theirs = None
    protocol = {
        "model": model_spec, "tokens": f"{shape[0]} x {shape[1]} held-out tokens",
        "ours": "quant.load_quantized in bfloat16 (and float32 for the noise floor)",
        "gptqmodel": f"gptqmodel {gptqmodel.__version__}, BACKEND.TORCH, cpu, bfloat16; LoRD-factored checkpoints "
                     "through quant/gptqmodel_lord.py",
        "transformers": "AutoModelForCausalLM.from_pretrained (GPTQ via gptqmodel + optimum), bfloat16",
        "calibration": "8 x 256 tokens",
        "tiny_model": "tiny-random-llama: random 2-layer Llama (hidden 256, MLP 512) with SmolLM2's tokenizer",
        "ok": "every quantized layer found, dequantized weights within 1% (bf16 scales), logits rel err "
              "< 3x our own bf16-vs-fp32 difference",
    }
    # every run merges into the one results file: a record replaces the one of the same model / case / loader,
    # the others (other models, cases not re-run) are kept, and each kind of run keeps its protocol entry
    tokens_bf16 = f"{shape[0]} x {shape[1]} held-out tokens (bf16 forwards on a CPU without native bf16)"
    if args.checkpoint:
        protocol = {f"checkpoints_{model_spec}": {
            "cases": {c: {"factored": f, "checkpoint": str(d), **cfg.to_dict()} for c, (_, cfg, f, d) in cases.items()},
            "loaders": "gptqmodel only", "load_seconds": "the loader call, cold (includes kernel selection)",
            "tokens": tokens_bf16}}
    elif args.real:
        path = Path(__file__).resolve().parent / "results" / "quant_interop.json"
        old = json.loads(path.read_text()).get("protocol", {}) if path.is_file() else {}
        ran = set(old.get(f"real_{model_spec}", {}).get("cases_run", [])) | set(cases)
        protocol = {f"real_{model_spec}": {
            "cases": {c: {"factored": f, **cfg.to_dict()} for c, (f, cfg) in REAL_CASES.items()},
            "lord": "uniform plan, -10% params, 16 x 256 calibration tokens", "loaders": "gptqmodel only",
            "tokens": tokens_bf16, "cases_run": sorted(ran)}}
    else:
        protocol["tiny_lord_cases"] = (
            f"tiny model factored at rank {TINY_RANK}: layer 0 q/k/v + o + gate/up + down, layer 1 k/v + gate/up + "
            "down (q_proj, o_proj dense); GPTQModel only")
    merge_records("quant_interop", records, protocol, key=("model", "case", "loader"))

if __name__ == "__main__":
    main()
