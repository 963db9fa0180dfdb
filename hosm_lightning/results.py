"""The summary of a split's likelihood as logged scalars, console lines, a Markdown table and files.

``res`` is the summary dict of ``lit/evaluation.py`` ``SplitEvaluation.finish``: ``split``, ``metric``
('nll' in nats for float data, 'bpd' in bits/dim for 8-bit data), ``mean``/``se``/``n``/``nfe``, per
protocol entries under ``protocols``, optional ``kl``/``entropy``/``gap``, and ``per_sample`` arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .core.dequantization import TAGS

__all__ = ["test_metrics", "result_lines", "write_results", "print_likelihood_table"]


def test_metrics(res: dict) -> dict[str, float]:
    """The logged scalars of a split summary: ``<split>/nll``, ``/nll_se``, ``/nll_gap``, ``/kl``, ``/kl_se``
    (nats) or ``<split>/bpd_<tag>``, ``_se``, ``_gap`` and ``/nfe_<tag>`` per protocol (bits/dim); ``/nfe``, ``/n``."""
    split = res["split"]
    logs = {f"{split}/nfe": res["nfe"], f"{split}/n": float(res["n"])}
    if res["metric"] == "nll":
        logs.update({f"{split}/nll": res["mean"], f"{split}/nll_se": res["se"]})
    for e in res.get("protocols", {}).values():
        tag = e["tag"]
        logs.update({f"{split}/bpd_{tag}": e["mean"], f"{split}/bpd_{tag}_se": e["se"], f"{split}/nfe_{tag}": e["nfe"]})
        if "gap" in e:
            logs[f"{split}/bpd_{tag}_gap"] = e["gap"]
    if "gap" in res:
        logs[f"{split}/nll_gap"] = res["gap"]
    if "kl" in res:
        logs.update({f"{split}/kl": res["kl"], f"{split}/kl_se": res["kl_se"]})
    return logs


def result_lines(res: dict) -> list[str]:
    """One console line per metric (nll) or protocol (bits/dim)."""
    split = res["split"]
    where = f"(n={res['n']}, repeats={res['num_repeats']}, {res['seconds']:.1f} s on {res['world_size']} rank(s))"
    if res["metric"] == "nll":
        kl = f", KL {res['kl']:.5f} ± {res['kl_se']:.5f}" if "kl" in res else ""
        return [f"{split} nll: {res['mean']:.5f} ± {res['se']:.5f} nats{kl} (mean NFE {res['nfe']:.0f}) {where}"]
    return [f"{split} bpd ({p}, K={e['num_importance']}): {e['mean']:.5f} ± {e['se']:.5f} bits/dim "
            f"(mean NFE {e['nfe']:.0f}) {where}" for p, e in res["protocols"].items()]


def write_results(res: dict, out_dir: str | Path) -> list[Path]:
    """``{split}_{metric}.json`` (the summary) and ``{split}_per_sample.npz`` (``index``, ``value`` [N, R]
    of the primary protocol, its ``mean`` per point, ``value_<tag>`` per protocol) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per = res["per_sample"]
    summary = {k: v for k, v in res.items() if k != "per_sample"}
    json_path = out / f"{res['split']}_{res['metric']}.json"
    json_path.write_text(json.dumps(summary, indent=2))
    main = per.get(res.get("dequantization"), per.get("nll"))
    extra = {f"value_{TAGS[p]}": v for p, v in per.items() if p in TAGS} if len(per) > 2 else {}
    npz_path = out / f"{res['split']}_per_sample.npz"
    np.savez(npz_path, index=per["index"], value=main, mean=main.mean(1), metric=res["metric"],
             summary=json.dumps(summary), **extra)
    return [json_path, npz_path]


def print_likelihood_table(res: dict) -> None:
    """One row per protocol (bits/dim) or one row (NLL); KL = mean of log q0 − log p when known."""
    unit = "bits/dim" if res["metric"] == "bpd" else "nats"
    ent = res.get("entropy")
    ent_s = f"{ent:.4f}" if ent is not None else "n/a"
    kl = f"{res['kl']:.4f} ± {res['kl_se']:.4f}" if "kl" in res else "n/a"
    rows = [(p, e["num_importance"], e) for p, e in res.get("protocols", {}).items()] or [("-", "-", res)]
    print(f"\n| split | N | dequantization | K | {res['metric']} ({unit}) | ± s.e. | exact entropy | gap | KL (nats) | NFE | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for proto, k, e in rows:
        gap = f"{e['mean'] - ent:.4f}" if ent is not None else "n/a"
        print(f"| {res['split']} | {res['n']} | {proto} | {k} | {e['mean']:.4f} | {e['se']:.4f} | {ent_s} | {gap} | {kl} "
              f"| {e['nfe']:.0f} | {res['seconds']:.1f} |")
