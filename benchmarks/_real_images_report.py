"""The Markdown table and the sample-grid figure of ``real_images.py``."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch
from matplotlib.figure import Figure

from hosm_lightning.core.data_range import bytes_to_model
from hosm_lightning.plots import image_grid, save_figure
from hosm_lightning.progress import format_duration

from ._harness import markdown_table

NAMES = {"pre": "first-order pre-training (start)", "control": "+ order 1 (control)", "order2": "+ order 2",
         "order3": "+ order 3 (Hutchinson)", "fm2": "+ fm2 (flow matching, λ₂ = 1/D)",
         "lw1": "+ order 1, likelihood weighting, importance t", "lw2": "+ order 2, likelihood weighting, importance t"}
BASE_NAMES = {"sigma2": "ε-prediction, σ² weighting, uniform t (the paper's)",
              "velocity": "velocity prediction, likelihood weighting, its proposal (i-DODE's)"}
COLUMNS = (("uniform", "test bpd, uniform"), ("tn_k1", "test bpd, TN K=1"), ("tn_k8", "test bpd, TN K=8"),
           ("train_uniform", "train bpd, uniform"))


def _cell(entry: dict, delta: bool) -> str:
    text = f"{entry['mean']:.4f} ± {entry['se']:.4f}"
    if delta and "delta" in entry:
        text += f" (Δ {entry['delta']:+.4f} ± {entry['delta_se']:.4f})"
    return text


def _quality(q: dict | None) -> list[str]:
    if q is None:
        return ["", ""]
    return [f"{q['fid']:.2f} ± {q['fid_se']:.2f}", f"{q['kid_mean']:.2f} ± {q['kid_std']:.2f}"]


def _accuracy(info: dict, res: dict) -> str:
    """The feature classifier's accuracy: held out where the validation images share the training classes;
    split by source, the held-out photographs are classes of their own, so only the training accuracy."""
    if res.get("val_classes_seen", True) and "val_accuracy" in info:
        return f"held-out accuracy {info['val_accuracy']:.3f}"
    return (f"training accuracy {info['train_accuracy']:.3f}; the validation photograph is not one of its classes, "
            "so it has no held-out accuracy")


def dataset_table(res: dict) -> str:
    header = ["model"] + [c[1] for c in COLUMNS] + ["FID ± s.e.", "KID ± s.d."]
    rows = []
    for tag in [t for t in NAMES if t in res["rows"]]:
        r = res["rows"][tag]
        rows.append([NAMES[tag]] + [_cell(r[c], tag not in ("pre", "control")) for c, _ in COLUMNS]
                    + _quality(res["quality"]["models"].get(tag)))
    for ref in res["references"]:
        se = f" ± {ref['se']:.4f}" if ref.get("se") is not None else ""
        rows.append([ref["name"], f"{ref['bpd']:.4f}{se}", "", "", "", "", ""])
    return markdown_table(header, rows)


def paper_table(res: dict) -> str | None:
    """Paired Δ of every fine-tune against the paper's recipe (order 2) on the same points, or None."""
    tags = [t for t in NAMES if "delta_paper" in res["rows"].get(t, {}).get("uniform", {})]
    if not tags:
        return None
    rows = [[NAMES[t]] + [f"{res['rows'][t][c]['delta_paper']:+.4f} ± {res['rows'][t][c]['delta_paper_se']:.4f}"
                          for c, _ in COLUMNS] for t in tags]
    return markdown_table(["fine-tune"] + [f"Δ {label} vs order 2" for _, label in COLUMNS], rows)


def diagnostics_table(diag: dict) -> str:
    """Paired Δ of dsm1 and dsm2 per σ for every fine-tune against the control (mean ± s.e.)."""
    labels = list(diag["delta"])
    header = ["σ"] + [f"{lab}: Δ{k}" for lab in labels for k in ("dsm1", "dsm2")]
    rows = [[f"{s:.3g}"] + [f"{diag['delta'][lab][k]['mean'][j]:+.2e} ± {diag['delta'][lab][k]['se'][j]:.1e}"
                            for lab in labels for k in ("dsm1", "dsm2")] for j, s in enumerate(diag["sigma"])]
    return markdown_table(header, rows)


def report(results: dict, args: dict, total: float) -> str:
    lines = [f"# Real images: the paper's protocol in bits/dim ({datetime.date.today()})", "",
             f"`python -m benchmarks.real_images{' --quick' if args.get('quick') else ''}` on {platform.machine()}, "
             f"{args['threads']} torch threads; this invocation {format_duration(total)} (a cached stage reports the "
             f"seconds recorded when it ran). Bits/dim: mean ± s.e. over the test "
             f"points; Δ: paired difference against the order-1 control (same points, same dequantization noise and "
             f"Hutchinson probes), mean ± s.e. ODE: dopri5, rtol = atol = {args['rtol']:g}.", ""]
    for name, res in results.items():
        pre, sec, fn, args = res["pre"], res["seconds"], res["quality"]["feature_net"], {**args, **res["budget"]}
        base = res.get("base", "sigma2")
        lines += [f"## {name}: {res['shape']}, {res['levels']} grey levels; first-order recipe: {BASE_NAMES[base]}", "",
                  f"{res['n_test']} test points ({args['k8_points']} for K = 8); train bpd on {res['n_test']} training "
                  f"points. Pre-training: {pre['steps']} steps, change of the paired test bits/dim over the last quarter "
                  f"{pre['last_quarter_change']:+.4f} ({'converged' if pre['converged'] else 'NOT converged'} by the "
                  f"< 0.01 rule). Fine-tunes: {args['finetune']} steps each. FID/KID: {args['samples']} samples per "
                  f"model against {res['n_train_items']} training items, features of a classifier ({_accuracy(fn, res)}).", "",
                  dataset_table(res), ""]
        vs_paper = paper_table(res)
        if vs_paper:
            lines += ["Paired against the paper's recipe (order 2 from the ε-prediction σ²-weighted pre-training"
                      f"{'' if base == 'sigma2' else ', the --base sigma2 run'}) on the same points (negative: better "
                      "than it):", "",
                      vs_paper, ""]
        lines += [f"Where the fine-tunes differ from the control: paired DSM terms per noise level on "
                  f"{res['diagnostics']['n']} test images (`diagnose` on images; each term is its order's "
                  f"matching error plus a constant, so a negative Δ is a smaller error there):", "",
                  diagnostics_table(res["diagnostics"]), "",
                  "Seconds: " + ", ".join(f"{k} {format_duration(v)}" for k, v in sec.items())
                  + f"; data set total {format_duration(res['total_seconds'])}.", "",
                  f"![samples]({Path(res['figure']).name})", ""]
    return "\n".join(lines)


def sample_figure(name: str, grids: dict, real: torch.Tensor, out: Path, levels: int) -> str:
    """Real training images next to each model's samples (uint8 levels [N, C, H, W] each) → PNG path."""
    panels = {"real (training patches, random)": real, **{NAMES.get(k, k): v for k, v in grids.items()}}
    fig = Figure(figsize=(3.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, x) in zip(axes, panels.items()):
        unit = bytes_to_model(x, False, levels=levels)
        grid = image_grid(unit, centered=False, nrow=8)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    path = Path(out) / f"real_images_{name}_samples.png"
    save_figure(fig, path)
    return str(path)
