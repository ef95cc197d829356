"""Why LoRD + GPTQ-4 costs more than GPTQ-4 on the dense model, and what fixes it (issue 14 part 2).

Two parts, one run, same calibration batch and held-out windows for every point:

* ``--diagnose-layers``: per LoRD group of a few decoder layers (float model, inputs from the float prefix),
  the relative output error ``||(up down - Q(up) Q(down)) X||^2 / ||up down X||^2`` of quantizing ``down``
  alone, ``up`` alone (GPTQ and RTN), both, both with each remedy, and GPTQ on the product ``up down`` as a
  dense matrix; plus the factors' scale statistics (spectrum of ``down``'s row norms, ``up``'s entry
  outliers, how diagonal ``up``'s Hessian is).
* ``--variants``: whole-model GPTQ-4 of the dense model (reference) and of the LoRD model with each
  ``QuantConfig`` factor option, held-out ppl of each (in memory: ``quantize_model`` rounds the float rest
  through float16, so it is the checkpoint's model; one checkpoint per point is written to measure its size).

Records go to ``bench/results/quant_factors.json`` and, as stage ``gptq4*`` rows, into the shared
``bench/results/quality.json`` (merged by key, bench/common.py).

Run: OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/quant_factors.py --lord DIR
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

import forward
from evaluation import perplexity
from quant import QuantConfig, quantize_model, save_quantized
from quant.factors import balance_scales, factor_groups, pair_error, refit_up, rotation
from quant.gptq import GPTQ
from quant.rtn import rtn_quantize
from quant.sequential import _collect_hessians
from sources import calibration_batches, code_split, load_model

# name -> QuantConfig overrides (bits 4, g128, act-order for all); "dense" is the dense model's plain GPTQ-4
PLAIN = {"factor_upfit": False, "factor_rotate": False, "factor_balance": False, "grid": "minmax"}
VARIANTS: dict[str, dict] = {name: PLAIN | kw for name, kw in {
    "gptq4": {},
    "gptq4-upfit": {"factor_upfit": True},
    "gptq4-balanced": {"factor_balance": True},
    "gptq4-down8": {"down_bits": 8},
    "gptq4-up8": {"up_bits": 8},
    "gptq4-upfit-down8": {"factor_upfit": True, "down_bits": 8},
    "gptq4-mse": {"grid": "mse"},
    "gptq4-upfit-mse": {"factor_upfit": True, "grid": "mse"},
    "gptq4-rotate": {"factor_rotate": True},
    "gptq4-rotate-upfit": {"factor_rotate": True, "factor_upfit": True},
    "gptq4-rotate-upfit-mse": {"factor_rotate": True, "factor_upfit": True, "grid": "mse"},
}.items()}  # every option explicit: QuantConfig's defaults (rotate + upfit) are one of these variants
OFFLINE_PROTOCOL = {
    "what": "per-group relative output error tr(E G E^T)/tr(W G W^T) of GPTQ-4 (g128, act-order, sym) treatments "
            "of the LoRD factors, G = the decomposition's own calibration Gram (dense-model inputs); up's Hessian "
            "= down G down^T; input-side groups only (o_proj here; mlp.down_proj keeps output-side statistics)",
}
DENSE = {"dense": PLAIN, "dense-mse": PLAIN | {"grid": "mse"}}  # the dense model's GPTQ-4, stage gptq4 / gptq4-mse


def heldout_ppl(model, tok, split, args) -> float:
    return perplexity(model, tok, split.heldout, seq_len=args.ppl_len, n_windows=args.ppl_windows,
                      batch_size=4).ppl


def _rel(err: float, base: float) -> float:
    return round(err / max(base, 1e-30), 6)


def _outlier_ratio(w: torch.Tensor, gs: int = 128) -> float:
    """Mean over (row, column group) of max|w| / rms(w): how far min-max grids are stretched."""
    w = w.float()
    r, c = w.shape
    n = -(-c // gs)
    w = torch.nn.functional.pad(w, (0, n * gs - c)).reshape(r, n, gs)
    rms = w.square().mean(-1).sqrt().clamp_min(1e-30)
    return round(float((w.abs().amax(-1) / rms).mean()), 3)


def _gptq(h: GPTQ, w: torch.Tensor, bits: int, gs: int, mse: bool = False) -> torch.Tensor:
    return h.quantize(w, bits, gs, True, True, 0.01, 128, None, allow_partial=True, mse_grid=mse).dequantize()


def _upfit(up, down, qd, hx: GPTQ, gs: int, mse: bool) -> torch.Tensor:
    """Refit ``up`` on the quantized down, then GPTQ it with the quantized bottleneck's Hessian."""
    hq = GPTQ(up.shape[1])
    hq.H, hq.n_samples = (qd @ hx.H @ qd.T).float(), hx.n_samples
    return _gptq(hq, refit_up(up, down, qd, hx.H), 4, gs, mse)


def diagnose_group(layer, g, stats: dict[str, GPTQ], gs: int) -> dict:
    """One group of a decoder layer, with the Hessians the GPTQ walk collected."""
    down = layer.get_submodule(g.down).weight.detach().float()
    up = torch.cat([layer.get_submodule(u).weight.detach().float() for u in g.ups])
    return {"group": g.down.rsplit(".", 1)[0], **diagnose_pair(down, up, stats[g.down], stats[g.ups[0]], gs)}


def diagnose_pair(down: torch.Tensor, up: torch.Tensor, hx: GPTQ, hu: GPTQ, gs: int) -> dict:
    """Errors of every treatment of one pair (``up`` = the members' ups stacked; every member reads the same
    bottleneck), relative to the pair's float output energy on the calibration inputs."""
    h = hx.H
    w_hat = up @ down
    base = float(((w_hat @ h) * w_hat).sum())
    qd4, qd8 = _gptq(hx, down, 4, gs), _gptq(hx, down, 8, gs)
    qu4, qu8 = _gptq(hu, up, 4, gs), _gptq(hu, up, 8, gs)
    qu4_rtn = rtn_quantize(up, 4, gs, True, allow_partial=True).dequantize()
    up_fit = refit_up(up, down, qd4, h)
    qu_fit = _upfit(up, down, qd4, hx, gs, False)
    qd_mse = _gptq(hx, down, 4, gs, True)
    qu_mse = _gptq(hu, up, 4, gs, True)
    qu_fit_mse = _upfit(up, down, qd_mse, hx, gs, True)
    # balancing: D per rank direction, both factors requantized
    d = balance_scales(down, [up])
    down_b, up_b = down / d[:, None], up * d[None, :]
    hub = GPTQ(up.shape[1])
    hub.H, hub.n_samples = (h.new_tensor(0) + (down_b @ h @ down_b.T)).float(), hx.n_samples
    qd_b, qu_b = _gptq(hx, down_b, 4, gs), _gptq(hub, up_b, 4, gs)
    rot = rotation(down.shape[0]).float()
    down_r, up_r = rot.T @ down, up @ rot
    hur = GPTQ(up.shape[1])
    hur.H, hur.n_samples = (down_r @ h @ down_r.T).float(), hx.n_samples
    qd_r, qu_r = _gptq(hx, down_r, 4, gs), _gptq(hur, up_r, 4, gs)
    qu_r_fit = _upfit(up_r, down_r, qd_r, hx, gs, False)
    q_prod = _gptq(hx, w_hat, 4, gs)
    e_prod = w_hat - q_prod
    e_mse = w_hat - _gptq(hx, w_hat, 4, gs, True)
    hud = hu.H
    offdiag = hud - torch.diag(hud.diagonal())
    rows = down.norm(dim=1)
    return {
        "rank": down.shape[0], "in": down.shape[1], "out": up.shape[0],
        "down_only": _rel(pair_error(up, qd4, up, down, h), base),
        "up_only_gptq": _rel(pair_error(qu4, down, up, down, h), base),
        "up_only_rtn": _rel(pair_error(qu4_rtn, down, up, down, h), base),
        "both": _rel(pair_error(qu4, qd4, up, down, h), base),
        "both_upfit_float": _rel(pair_error(up_fit, qd4, up, down, h), base),
        "both_upfit": _rel(pair_error(qu_fit, qd4, up, down, h), base),
        "both_mse": _rel(pair_error(qu_mse, qd_mse, up, down, h), base),
        "both_upfit_mse": _rel(pair_error(qu_fit_mse, qd_mse, up, down, h), base),
        "both_rotated": _rel(pair_error(qu_r, qd_r, up_r, down_r, h), base),
        "up_only_rotated": _rel(pair_error(qu_r, down_r, up_r, down_r, h), base),
        "both_rotated_upfit": _rel(pair_error(qu_r_fit, qd_r, up_r, down_r, h), base),
        "both_balanced": _rel(pair_error(qu_b, qd_b, up_b, down_b, h), base),
        "down8_up4": _rel(pair_error(qu4, qd8, up, down, h), base),
        "down4_up8": _rel(pair_error(qu8, qd4, up, down, h), base),
        "product_dense_gptq4": _rel(float(((e_prod @ h) * e_prod).sum()), base),
        "product_dense_gptq4_mse": _rel(float(((e_mse @ h) * e_mse).sum()), base),
        "down_row_norm_max_over_min": round(float(rows.max() / rows.min().clamp_min(1e-30)), 1),
        "down_row_norm_max_over_median": round(float(rows.max() / rows.median()), 2),
        "up_col_norm_max_over_min": round(float(up.norm(dim=0).max() / up.norm(dim=0).min()), 3),
        "up_hessian_offdiag_frac": round(float(offdiag.norm() / hud.norm()), 4),
        "outlier_ratio_down": _outlier_ratio(down, gs), "outlier_ratio_up": _outlier_ratio(up, gs),
        "outlier_ratio_product": _outlier_ratio(w_hat, gs),
        "bits_per_weight_down8_up4": round((8 * down.numel() + 4 * up.numel()) / (down.numel() + up.numel()), 3),
    }


def diagnose(model, ids, layers_wanted: list[int], gs: int) -> list[dict]:
    out = []
    stream = forward.capture(model, ids, 0, 4)
    with torch.no_grad():
        for i, layer in forward.walk(model, stream):
            if i > max(layers_wanted):
                break
            if i not in layers_wanted:
                continue
            stats = _collect_hessians(layer, stream)
            for g in factor_groups(layer):
                rec = {"layer": i, **diagnose_group(layer, g, stats, gs)}
                print(json.dumps(rec))
                out.append(rec)
    return out


def diagnose_offline(lord_dir: Path, stats_path: Path, dense_dir: Path, layers: list[int], gs: int) -> list[dict]:
    """The same per-group diagnosis from tensors on disk, without running the model: the LoRD factors, the
    dense weights and the decomposition's own calibration Grams ``G = X^T X`` (dense-model inputs, input-side
    groups only). ``up``'s Hessian is then ``down G down^T``. Adds the dense weight's own GPTQ-4 error."""
    from safetensors import safe_open

    cfg = json.loads((lord_dir / "config.json").read_text())["lord"]["groups"]
    st = safe_open(str(stats_path), "pt")
    sides = json.loads(st.metadata().get("sides", "{}"))
    fl = safe_open(str(lord_dir / "model.safetensors"), "pt")
    fd = safe_open(str(dense_dir / "model.safetensors"), "pt")
    out = []
    for name, spec in cfg.items():
        i = int(name.split(".layers.")[1].split(".")[0])
        if i not in layers or sides.get(name, "input") != "input":
            continue
        members = spec["members"]
        down = fl.get_tensor(f"{members[0]}.down.weight").float()
        up = torch.cat([fl.get_tensor(f"{m}.up.weight").float() for m in members])
        w = torch.cat([fd.get_tensor(f"{m}.weight").float() for m in members])
        g = st.get_tensor(f"{name}.gram").float()
        hx = GPTQ(g.shape[0])
        hx.H, hx.n_samples = 2 * g / g.diagonal().mean(), 1
        hu = GPTQ(down.shape[0])
        hu.H, hu.n_samples = down @ hx.H @ down.T, 1
        base_w = float(((w @ hx.H) * w).sum())
        e_w = w - _gptq(hx, w, 4, gs)
        e_t = w - up @ down
        rec = {"layer": i, "group": name.split(f".layers.{i}.")[1], **diagnose_pair(down, up, hx, hu, gs),
               "dense_weight_gptq4": _rel(float(((e_w @ hx.H) * e_w).sum()), base_w),
               "lord_truncation": _rel(float(((e_t @ hx.H) * e_t).sum()), base_w),
               "outlier_ratio_dense": _outlier_ratio(w, gs)}
        print(json.dumps(rec))
        out.append(rec)
    return out


def size_mb(model, tok, cfg: QuantConfig) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="qf-", dir=str(Path(tempfile.gettempdir()))))
    try:
        return save_quantized(model, tok, tmp, cfg).stat().st_size / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lord", required=True, help="LoRD float checkpoint dir (lord decompose --out)")
    ap.add_argument("--variants", nargs="*", default=[*DENSE, "diagnose", *VARIANTS],
                    help="steps in order: dense variants, 'diagnose' (per-group errors), LoRD variants")
    ap.add_argument("--diagnose-layers", nargs="*", type=int, default=[2, 12, 21])
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ppl-dense", type=float, default=None, help="dense held-out ppl from an earlier run")
    ap.add_argument("--gptq-threads", type=int, default=None, help="torch threads while quantizing")
    ap.add_argument("--stop-at", type=float, default=None, help="unix time after which no new step starts")
    ap.add_argument("--offline-stats", default=None, help="diagnose from the decomposition's stats.safetensors "
                    "and the checkpoints on disk (no model forward), then stop")
    ap.add_argument("--no-quality", action="store_true", help="do not merge into quality.json (smoke runs)")
    ap.add_argument("--merge-only", action="store_true", help="only merge quant_factors.json into quality.json")
    args = ap.parse_args()
    if args.offline_stats:
        from sources.models import resolve_model_dir

        diag = diagnose_offline(Path(args.lord), Path(args.offline_stats), resolve_model_dir(args.model),
                                args.diagnose_layers, args.group_size)
        prev = RESULTS / "quant_factors.json"
        doc = json.loads(prev.read_text()) if prev.is_file() else {"protocol": {}, "records": []}
        doc["protocol"]["offline"] = OFFLINE_PROTOCOL | {"stats": str(args.offline_stats), "lord": str(args.lord)}
        old = [d for d in doc.get("diagnosis_offline", []) if d["layer"] not in args.diagnose_layers]
        write_results("quant_factors", doc["protocol"], doc["records"], **{k: v for k, v in doc.items() if k not in (
            "benchmark", "created", "environment", "protocol", "records", "diagnosis_offline")},
            diagnosis_offline=old + diag)
        return
    if args.merge_only:
        doc = json.loads((RESULTS / "quant_factors.json").read_text())
        merge_quality(doc["records"], doc["protocol"])
        return
    split = code_split()
    lord_dir = Path(args.lord)
    lmeta = json.loads((lord_dir / "metrics.json").read_text())
    protocol = {"calibration": f"{args.calib_seqs} x {args.calib_len} (seed 0, calibration split)",
                "heldout": f"{args.ppl_windows} x {args.ppl_len} held-out windows", "bits": 4,
                "group_size": args.group_size, "act_order": True, "sym": True, "lord": str(lord_dir)}
    out_name = "quant_factors"
    prev = RESULTS / f"{out_name}.json"
    doc = json.loads(prev.read_text()) if prev.is_file() else {}
    records: list[dict] = [r for r in doc.get("records", []) if r["variant"] not in args.variants]
    diag: list[dict] = doc.get("diagnosis", []) if "diagnose" not in args.variants else []
    offline: list[dict] = doc.get("diagnosis_offline", [])

    dense, tok = load_model(args.model)
    ids = calibration_batches(tok, split.calibration, n_seqs=args.calib_seqs, seq_len=args.calib_len, seed=0)
    ppl_dense = args.ppl_dense or heldout_ppl(dense, tok, split, args)
    print(f"dense ppl {ppl_dense:.4f}")
    protocol["ppl_dense_from"] = "--ppl-dense (an earlier run, same windows)" if args.ppl_dense else "this run"

    def quantize(m, cfg):
        """GPTQ's column loop is thousands of small ops: on a contended CPU one thread ran it 2.3x faster."""
        threads = torch.get_num_threads()
        torch.set_num_threads(args.gptq_threads or threads)
        try:
            t0 = time.perf_counter()
            return quantize_model(m, cfg, ids), time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)

    def time_left() -> bool:
        if args.stop_at and time.time() > args.stop_at:
            print("stopping: --stop-at reached")
            return False
        return True

    def record(variant: str, plan: str, model, cfg, secs: float, ppl: float, ppl_float: float, rep) -> None:
        summ = rep.summary()
        stage = {"dense": "gptq4", "dense-mse": "gptq4-mse"}.get(variant, variant)
        rec = {"model": args.model, "stage": stage,
               "variant": variant, "plan": plan,
               "param_reduction": 0.0 if plan == "dense" else lmeta.get("param_reduction"),
               "linear_param_reduction": 0.0 if plan == "dense" else lmeta.get("linear_param_reduction"),
               "params": sum(p.numel() for p in model.parameters()),
               "ppl": round(ppl, 4), "ppl_float": round(ppl_float, 4), "ppl_dense": round(ppl_dense, 4),
               "ppl_increase": round(ppl / ppl_dense - 1, 5), "ppl_vs_float": round(ppl / ppl_float, 4),
               "size_mb": round(size_mb(model, tok, cfg), 1),
               "avg_bits_per_weight": round(summ["avg_bits_per_weight"], 4), "seconds": round(secs, 1),
               "config": {k: v for k, v in cfg.to_dict().items() if k in ("bits", "group_size", "act_order",
                          "factor_upfit", "factor_balance", "factor_rotate", "down_bits", "up_bits", "grid", "n_seqs", "seq_len")}}
        print(json.dumps(rec))
        records.append(rec)
        write_results(out_name, protocol, records, diagnosis=diag, diagnosis_offline=offline)

    for variant in [v for v in args.variants if v in DENSE]:
        if not time_left():
            break
        cfg = QuantConfig(bits=4, group_size=args.group_size, act_order=True, n_seqs=args.calib_seqs,
                          seq_len=args.calib_len, **DENSE[variant])
        m = copy.deepcopy(dense)
        rep, secs = quantize(m, cfg)
        record(variant, "dense", m, cfg, secs, heldout_ppl(m, tok, split, args), ppl_dense, rep)
        del m
    del dense
    gc.collect()

    lord, _ = load_model(str(lord_dir))
    ppl_float = heldout_ppl(lord, tok, split, args)
    print(f"lord float ppl {ppl_float:.4f}")
    plan = lmeta.get("plan", "lord")
    for step in [v for v in args.variants if v in VARIANTS or v == "diagnose"]:  # in the order given
        if not time_left():
            break
        if step == "diagnose":
            t0 = time.perf_counter()
            threads = torch.get_num_threads()
            torch.set_num_threads(args.gptq_threads or threads)
            diag.extend(diagnose(lord, ids, args.diagnose_layers, args.group_size))
            torch.set_num_threads(threads)
            print(f"diagnosis {time.perf_counter() - t0:.0f}s")
            write_results(out_name, protocol, records, diagnosis=diag, diagnosis_offline=offline)
            continue
        cfg = QuantConfig(bits=4, group_size=args.group_size, act_order=True, n_seqs=args.calib_seqs,
                          seq_len=args.calib_len, **VARIANTS[step])
        m = copy.deepcopy(lord)
        rep, secs = quantize(m, cfg)
        record(step, plan, m, cfg, secs, heldout_ppl(m, tok, split, args), ppl_float, rep)
        del m
        gc.collect()
    if not args.no_quality:
        merge_quality(records, protocol)


def merge_quality(records: list[dict], protocol: dict) -> None:
    """Our rows into the shared quality.json (stage = variant, so the shared key stays unique)."""
    import common

    if not hasattr(common, "merge_records"):
        print("bench/common.merge_records is not on this branch yet: quality.json not updated (rerun with "
              "--merge-only once it is)")
        return
    rows = [{k: v for k, v in r.items() if k != "config"} for r in records]
    common.merge_records("quality", rows, protocol={"quant_factors": protocol})

if __name__ == "__main__":
    main()
