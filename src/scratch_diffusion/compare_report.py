"""The comparison report: one table of every (model, sampler, steps) with its quality (95% intervals) and cost, the
figures that go with it, and a generated summary that names the best setting, the settings within noise of it, and
the cheapest of those. Without a classifier (an unlabelled dataset) recognised and coverage read n/a; FID and KID are
on Inception-v3 features where the judge has them, else they read n/a too and no setting is named best."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scratch_diffusion.files import atomic_path, write_text  # noqa: E402
from scratch_diffusion.images import grid  # noqa: E402
from scratch_diffusion.metrics import METRICS, verdict  # noqa: E402

# What each row is, titled by its key; the numbers beside them are the declared metrics (metrics.METRICS).
IDENTITY = ("setting", "model", "corruption", "objective", "conditioning", "sampler", "steps")
NA = "n/a"  # a value that could not be measured (None), e.g. FID without a classifier; a value not asked for is blank


def columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(key, title, format) of the table's columns: the identity, then every metric that has a title, in declaration
    order; the class-conditional ones only when some row has them (blank for the others)."""
    conditional = any(m.key in r for r in rows for m in METRICS if m.conditional)
    shown = [m for m in METRICS if m.title is not None and (conditional or not m.conditional)]
    return [(key, key, "{}") for key in IDENTITY] + [(m.key, m.title, m.fmt) for m in shown]


def settings_metrics(rows: list[dict]) -> dict[str, dict]:
    """metrics/compare.json's `settings`: per setting, every metric declared to_json that the row has (with its
    interval, where declared so)."""
    keys = [m.key for m in METRICS if m.to_json]
    keys += [f"{m.key}_{side}" for m in METRICS if m.to_json and m.json_interval for side in ("lo", "hi")]
    return {r["setting"]: {k: r[k] for k in keys if r.get(k) is not None} for r in rows}


def _cell(r: dict, key: str, fmt: str) -> str:
    if key not in r:
        return ""
    if r[key] is None:
        return NA
    text = fmt.format(r[key])
    if r.get(f"{key}_lo") is not None:  # the 95% interval beside the value
        text += f" [{fmt.format(r[f'{key}_lo'])}, {fmt.format(r[f'{key}_hi'])}]"
    return text


def summarise(rows: list[dict], replicates: dict[str, dict], floor: float | None) -> dict:
    """The best setting by FID, each row's verdict against it (sets `verdict` in the rows: best / within noise /
    worse) and the cheapest (fewest seconds per image) of those within noise of it. Without FID (floor None: the
    judge has no classifier) there is no best: every verdict is None (n/a) and `fastest` is the cheapest of all."""
    if floor is None:
        for r in rows:
            r["verdict"] = None
        fastest = min(rows, key=lambda r: r["seconds_per_image"])
        return {"best": None, "near_best": [], "fastest_near_best": None, "fastest": fastest, "floor": None}
    best = min(rows, key=lambda r: r["fid"])
    judged = lambda r: {**r, "replicates": replicates[r["setting"]]}  # noqa: E731
    for r in rows:
        r["verdict"] = "best" if r is best else verdict(judged(r), judged(best), "fid")
    near = [r for r in rows if r["verdict"] in ("best", "within noise")]
    fastest = min(near, key=lambda r: r["seconds_per_image"])
    return {"best": best, "near_best": near, "fastest_near_best": fastest, "floor": floor}


def summary_text(summary: dict) -> str:
    if summary["best"] is None:
        f = summary["fastest"]
        return (
            "No setting is named best: without a classifier there is no FID to rank the settings by (see below). "
            f"The cheapest: **{f['setting']}** (NFE {f['nfe']}, {f['seconds_per_image'] * 1000:.1f} ms per image; "
            f"memorised {f['memorised']:.3f})."
        )
    b, f = summary["best"], summary["fastest_near_best"]
    # Inception features (an unlabelled dataset) give FID and KID but no recognised share: that needs classes.
    recognised = ""
    if b["recognised"] is not None:
        recognised = f"{b['recognised']:.0%} of samples recognised with confidence > 0.9; "
    text = (
        f"Best setting: **{b['setting']}** (FID {b['fid']:.2f} [95%: {b['fid_lo']:.2f}, {b['fid_hi']:.2f}], "
        f"{b['fid'] / summary['floor']:.1f}x the real-data floor of {summary['floor']:.2f}; KID {b['kid']:.3g}; "
        f"{recognised}{b['seconds_per_image'] * 1000:.1f} ms per image)."
    )
    others = [r["setting"] for r in summary["near_best"] if r is not b]
    if others:
        text += f" Within noise of it on FID (the 95% interval of the difference holds 0): {', '.join(others)}."
    else:
        text += " Every other setting is worse beyond the noise."
    if f["setting"] != b["setting"]:
        text += (
            f" The cheapest of those: **{f['setting']}** (NFE {f['nfe']}, {f['seconds_per_image'] * 1000:.1f} ms per "
            f"image, {b['seconds_per_image'] / f['seconds_per_image']:.1f}x faster)."
        )
    return text


def weak_judge(accuracy: float | None, bound: float) -> str:
    """The sentence a report and a stage open with when the classifier behind FID is below the accuracy a judge
    needs ('' when it is not, or there is no classifier)."""
    if accuracy is None or accuracy >= bound:
        return ""
    return (
        f"A weak judge: the classifier behind FID, recognised and coverage has test accuracy {accuracy:.1%}, below the "
        f"{bound:.0%} a judge needs, so its FIDs rank little and every verdict below rests on it (no champion is "
        "promoted); train it longer (classifier.epochs or classifier.max_steps)."
    )


def _cells(r: dict, cols: list[tuple[str, str, str]], weak: bool) -> list[str]:
    """A row's cells; on a `weak` judge each verdict says that it rests on one."""
    on = " (weak judge)" if weak else ""
    return [_cell(r, key, fmt) + (on if key == "verdict" and r.get(key) else "") for key, _, fmt in cols]


def markdown_table(rows: list[dict], weak: bool = False) -> str:
    cols = columns(rows)
    head = "| " + " | ".join(label for _, label, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_cells(r, cols, weak)) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, label=name)
    ax.set(
        xlabel="optimizer step",
        ylabel="training loss (each model's own objective)",
        yscale="log",
        title="training loss",
    )
    ax.legend()
    _save(fig, path)


def plot_fid_vs_nfe(rows: list[dict], floor: float, path: Path, features: str = "classifier") -> None:
    """FID against NFE with 95% bars, one line per (model, sampler); `features`: what FID is measured on."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['model']} / {r['sampler']}", []).append(r)
    for i, (name, group) in enumerate(sorted(groups.items())):
        group = sorted(group, key=lambda r: r["nfe"])
        fid = np.array([r["fid"] for r in group])
        bars = [fid - [r.get("fid_lo", r["fid"]) for r in group], [r.get("fid_hi", r["fid"]) for r in group] - fid]
        ax.errorbar([r["nfe"] for r in group], fid, yerr=bars, fmt="o-", capsize=3, color=f"C{i % 10}", label=name)
    ax.axhline(floor, color="grey", linestyle="--", label=f"real data floor ({floor:.2f})")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="model evaluations per image (NFE)",
        ylabel=f"FID ({features} features)",
        title="sample quality against cost (bars: 95% bootstrap intervals)",
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_guidance(rows: list[dict], path: Path, chance: float) -> None:
    """Class-conditional sets: conditional accuracy and FID against the guidance scale, one line per sampler, beside
    the `chance` accuracy (1 / classes)."""
    fig, (acc_ax, fid_ax) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("cond_accuracy") is not None:
            groups.setdefault(f"{r['sampler']}-{r['steps']}", []).append(r)
    for i, (name, group) in enumerate(sorted(groups.items())):
        group = sorted(group, key=lambda r: r["guidance_scale"])
        scales = [r["guidance_scale"] for r in group]
        acc_ax.plot(scales, [r["cond_accuracy"] for r in group], "o-", color=f"C{i % 10}", label=name)
        fid_ax.plot(scales, [r["fid"] for r in group], "o-", color=f"C{i % 10}", label=name)
    acc_ax.axhline(chance, color="grey", linestyle=":", label="chance")
    acc_ax.set(
        xlabel="guidance scale (0 = unconditional, 1 = conditional)",
        ylabel="conditional accuracy",
        title="samples read as the class asked for",
        ylim=(0, 1.02),
    )
    fid_ax.set(xlabel="guidance scale", ylabel="FID (classifier features)", title="overall FID", yscale="log")
    acc_ax.legend(fontsize=8)
    _save(fig, path)


def best_conditional(rows: list[dict]) -> dict | None:
    """The class-conditional set drawn most often as the classes asked for (lower FID breaks a tie); None: none."""
    conditional = [r for r in rows if r.get("cond_accuracy") is not None]
    return max(conditional, key=lambda r: (r["cond_accuracy"], -r["fid"])) if conditional else None


def class_table(row: dict) -> tuple[list[str], list[list[str]]]:
    """Per class asked for in one class-conditional set, by the dataset's name for it: the share the judge reads as
    that class and its FID against as many real images of it (blank where the test split has too few)."""
    fids = row.get("fid_per_class") or {}
    body = [
        [name, f"{share:.3f}", f"{fids[name]:.2f}" if name in fids else ""]
        for name, share in row["cond_accuracy_per_class"].items()
    ]
    return ["class", "read as asked", "FID of the class"], body


def plot_class_grid(
    images: np.ndarray, labels: np.ndarray, path: Path, names: list[str], title: str, per_class: int = 10
) -> None:
    """One row per class asked for, captioned with its name: the first `per_class` samples asked to be that class."""
    asked = sorted(set(labels.tolist()))
    rows = [images[labels == c][:per_class] for c in asked]
    side = images.shape[1] + 2  # grid() pads each image by 2 pixels
    fig, ax = plt.subplots(figsize=(7.5, 0.3 + 0.6 * len(asked)))
    ax.imshow(grid(np.concatenate(rows), nrow=per_class), cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([side * (i + 0.5) for i in range(len(asked))], names, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _save(fig, path)


def plot_montage(rows: list[dict], images: dict[str, np.ndarray], path: Path, per_setting: int = 32) -> None:
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows, strict=False):
        ax.imshow(grid(images[r["setting"]][:per_setting], nrow=8), cmap="gray", vmin=0, vmax=255)
        quality = f"FID {r['fid']:.2f}" if r.get("fid") is not None else f"memorised {r['memorised']:.3f}"
        ax.set_title(f"{r['setting']}\n{quality}", fontsize=8)
    _save(fig, path)


def write_report(
    rows: list[dict], summary: dict, context: dict, figures: dict[str, Path], out_md: Path, out_html: Path
) -> None:
    """reports/compare.md (figures linked) and a self-contained HTML page (figures inline). `context`: n, and the
    judge's classifier_accuracy, num_classes and real_recognised, or (no classifier) no_classifier saying why and
    fid_features, what FID was measured on instead (None: nothing)."""
    n, floor = context["n"], summary["floor"]
    memorised = (
        "*memorised*: share of samples closer to a training image than 99% of real test images are (real test "
        "images: 0.01 by construction)."
    )
    kid = (
        f"*KID*: kernel inception distance on the same features (unbiased: comparable across n), mean over subsets of "
        f"{n // 2}."
    )
    verdicts = (
        "*FID vs best*: worse only where the 95% interval of the FID difference excludes 0, else within noise; a "
        "difference within noise is no evidence that one setting is better."
    )
    if floor is not None and context.get("fid_features"):
        intro = (
            f"Every sample set has n = {n} images. FID is measured on {context['fid_features']} (torchmetrics' FID "
            f"network; the dataset has no classes to train a classifier on) against {n} real test images; "
            f"**{floor:.2f}** is the FID of {n} other real test images (the floor). These Inception FIDs compare with "
            f"no classifier FID. recognised and coverage KL read {NA}, not measured: {context['no_classifier']}. "
            f"{memorised} {kid} Brackets: 95% intervals (bootstrap over the sample set; KID: the spread of its "
            f"subsets). {verdicts}"
        )
    elif floor is None:
        intro = (
            f"Every sample set has n = {n} images. FID, KID, recognised and coverage KL read {NA}, not measured: "
            f"{context['no_classifier']}. {memorised} It compares pixels and needs no classifier. Brackets: 95% "
            "intervals (bootstrap over the sample set). *s / image*: the sampling cost."
        )
    else:
        k = context["num_classes"]
        intro = (
            f"Every sample set has n = {n} images. FID is measured on the penultimate features of the pipeline's own "
            f"classifier of the dataset's {k} classes (test accuracy {context['classifier_accuracy']:.2%}) against "
            f"{n} real test images; **{floor:.2f}** is the FID of {n} other real test images (the floor). "
            "*recognised*: share of samples the classifier assigns one class with probability > 0.9 (real test "
            f"images: {context['real_recognised']:.3f}). *coverage KL*: KL divergence of the predicted-class "
            f"histogram from uniform (0 = all classes equally often, {math.log(k):.2f} = one class only). "
            f"{memorised} {kid} Brackets: 95% intervals (bootstrap over the sample set; KID: the spread of its "
            f"subsets). {verdicts}"
        )
    title = "Which design choice makes better samples"
    weak = context.get("weak_judge", "")
    md = [
        f"# {title}",
        "",
        *([f"**{weak}**", ""] if weak else []),
        summary_text(summary),
        "",
        intro,
        "",
        markdown_table(rows, weak=bool(weak)),
        "",
    ]
    best = best_conditional(rows)
    if best is not None:
        head, body = class_table(best)
        md += [f"## Per class: {best['setting']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body] + [""]
    for title, fig in figures.items():
        md += [f"## {title}", "", f"![{title}]({fig.relative_to(out_md.parent).as_posix()})", ""]
    write_text(out_md, "\n".join(md))

    def inline(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    cells = lambda vals, tag: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in vals)  # noqa: E731
    cols = columns(rows)
    table = "<table><tr>" + cells([label for _, label, _ in cols], "th") + "</tr>"
    for r in rows:
        table += "<tr>" + cells(_cells(r, cols, bool(weak)), "td") + "</tr>"
    table += "</table>"
    bold = lambda s: html.escape(s).replace("**", "")  # noqa: E731
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>scratch-diffusion: compare</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
        f"<h1>{title}</h1>",
        *([f"<p><strong>{html.escape(weak)}</strong></p>"] if weak else []),
        f"<p>{bold(summary_text(summary))}</p><p>{bold(intro)}</p>",
        table,
    ]
    if best is not None:
        page.append(f"<h2>Per class: {html.escape(best['setting'])}</h2><table><tr>{cells(head, 'th')}</tr>")
        page += [f"<tr>{cells(line, 'td')}</tr>" for line in body] + ["</table>"]
    for title, fig in figures.items():
        page.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{inline(fig)}'>")
    page.append("</body></html>")
    write_text(out_html, "\n".join(page))
