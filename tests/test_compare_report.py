"""The compare report's summary: the best setting, the verdict of every other against it, the cheapest near it; its
columns and metrics/compare.json's settings, both from the metrics' declarations (metrics.METRICS)."""

import json

import numpy as np

from scratch_diffusion.compare_report import (
    IDENTITY,
    _cell,
    columns,
    markdown_table,
    settings_metrics,
    summarise,
    summary_text,
    write_report,
)
from scratch_diffusion.metrics import BY_KEY, METRICS
from tests.conftest import REPO


def row(setting: str, fid: float, half: float, seconds: float) -> dict:
    return {
        "setting": setting,
        "model": "unet2d",
        "sampler": setting.split("-")[0],
        "steps": 10,
        "nfe": 10,
        "fid": fid,
        "fid_lo": fid - half,
        "fid_hi": fid + half,
        "kid": fid / 100,
        "kid_lo": 0.0,
        "kid_hi": 1.0,
        "recognised": 0.8,
        "coverage_kl": 0.01,
        "memorised": 0.0,
        "seconds_per_image": seconds,
    }


def test_summary_names_the_settings_within_noise_and_the_cheapest_of_them():
    g = np.random.default_rng(0)
    rows = [row("ddim-50", 60.0, 3.0, 0.05), row("heun-15", 61.0, 3.0, 0.02), row("ddpm-100", 90.0, 3.0, 0.1)]
    replicates = {r["setting"]: {"fid": r["fid"] + g.normal(0, 1.5, 200)} for r in rows}
    summary = summarise(rows, replicates, floor=12.0)
    assert [r["verdict"] for r in rows] == ["best", "within noise", "worse"]
    assert summary["fastest_near_best"]["setting"] == "heun-15"
    text = summary_text(summary)
    assert "Within noise of it on FID" in text and "heun-15" in text and "ddpm-100" not in text
    assert "| 60.00 [57.00, 63.00] | best |" in markdown_table(rows)


def conditional_row(setting: str) -> dict:
    """A class-conditional set's row, every measured key present (as the compare stage builds it)."""
    return {
        **row(setting, 70.0, 3.0, 0.05),
        "coverage_kl_lo": 0.0,
        "coverage_kl_hi": 0.02,
        "coverage_entropy": 2.29,
        "memorised_lo": 0.0,
        "memorised_hi": 0.0,
        "recognised_lo": 0.78,
        "recognised_hi": 0.82,
        "verdict": "best",
        "guidance_scale": 3.0,
        "cond_accuracy": 0.9,
        "cond_accuracy_lo": 0.85,
        "cond_accuracy_hi": 0.95,
        "fid_per_class": {"3": 70.0},
        "fid_class_mean": 70.0,
        "cond_accuracy_per_class": {"3": 0.9},
    }


def test_the_table_and_the_json_carry_each_metric_as_declared():
    plain, cond = row("ddim-50", 60.0, 3.0, 0.05), conditional_row("ddim-50-g3")
    titled = [m.key for m in METRICS if m.title is not None]
    assert [key for key, _, _ in columns([plain, cond])] == [*IDENTITY, *titled]
    assert [key for key, _, _ in columns([plain])] == [*IDENTITY, *(k for k in titled if not BY_KEY[k].conditional)]
    assert "| cond. accuracy [95%] |" in markdown_table([plain, cond]) and "cond." not in markdown_table([plain])
    saved = settings_metrics([plain, cond])["ddim-50-g3"]
    for metric in METRICS:
        assert (metric.key in saved) == metric.to_json, metric.key
        for side in ("lo", "hi"):
            if f"{metric.key}_{side}" in cond:
                assert (f"{metric.key}_{side}" in saved) == (metric.to_json and metric.json_interval), metric.key
    # Pinned: what metrics/compare.json keeps per setting (`dvc exp show` lists it; a change here changes that file).
    assert sorted(saved) == [
        "cond_accuracy",
        "cond_accuracy_hi",
        "cond_accuracy_lo",
        "coverage_kl",
        "fid",
        "fid_class_mean",
        "fid_hi",
        "fid_lo",
        "guidance_scale",
        "kid",
        "kid_hi",
        "kid_lo",
        "memorised",
        "nfe",
        "recognised",
        "recognised_hi",
        "recognised_lo",
        "seconds_per_image",
        "verdict",
    ]
    assert "verdict" not in settings_metrics([plain])["ddim-50"]  # unset values stay out


def test_the_committed_report_renders_the_committed_json():
    """reports/compare.md and metrics/compare.json come from one compare run: the table's header is the declared
    columns, and each setting's cells are its JSON values in the declared formats (where a metric's interval stays
    out of the JSON, its value)."""
    compare = json.loads((REPO / "metrics/compare.json").read_text())
    lines = (REPO / "reports/compare.md").read_text().splitlines()
    rows = [{"setting": setting, **values} for setting, values in compare["settings"].items()]
    cols = columns(rows)
    assert "| " + " | ".join(title for _, title, _ in cols) + " |" in lines
    for r in rows:
        line = next(line for line in lines if line.startswith(f"| {r['setting']} |"))
        cells = dict(zip([key for key, _, _ in cols], line[2:-2].split(" | "), strict=True))
        for key, _, fmt in cols:
            if key not in r:
                continue
            if key in BY_KEY and not BY_KEY[key].json_interval:
                assert cells[key].startswith(_cell(r, key, fmt)), (r["setting"], key)
            else:
                assert cells[key] == _cell(r, key, fmt), (r["setting"], key)


def test_without_a_classifier_nothing_is_named_best_and_the_unmeasured_read_n_a():
    """An unlabelled dataset's rows: FID, KID, recognised and coverage None (measured by no one), memorisation and
    cost measured. No best, no verdict; the cheapest is named; the JSON keeps only what was measured."""
    unmeasured = dict.fromkeys(("fid", "fid_lo", "fid_hi", "kid", "kid_lo", "kid_hi", "recognised", "coverage_kl"))
    rows = [{**row(name, 0.0, 0.0, seconds), **unmeasured} for name, seconds in (("ddim-50", 0.05), ("heun-15", 0.02))]
    summary = summarise(rows, {}, floor=None)
    assert summary["best"] is None and summary["fastest"]["setting"] == "heun-15"
    assert [r["verdict"] for r in rows] == [None, None]
    text = summary_text(summary)
    assert text.startswith("No setting is named best") and "**heun-15**" in text
    table = markdown_table(rows)
    assert "| 10 | n/a | n/a | n/a | n/a | n/a | 0.000 | 0.0500 |" in table  # NFE, FID .. coverage, memorised, cost
    assert sorted(settings_metrics(rows)["heun-15"]) == ["memorised", "nfe", "seconds_per_image"]


def test_the_report_speaks_of_the_datasets_classes_and_the_judges_accuracy(tmp_path):
    rows = [row("ddim-50", 60.0, 3.0, 0.05)]
    summary = summarise(rows, {"ddim-50": {"fid": np.full(10, 60.0)}}, floor=12.0)
    context = {"n": 6, "classifier_accuracy": 0.875, "num_classes": 3, "real_recognised": 0.9, "no_classifier": None}
    write_report(rows, summary, context, {}, tmp_path / "compare.md", tmp_path / "compare.html")
    report = (tmp_path / "compare.md").read_text()
    assert "classifier of the dataset's 3 classes (test accuracy 87.50%)" in report
    assert "1.10 = one class only" in report and "digit" not in report


def test_a_weak_judge_is_said_first_and_marks_every_verdict(tmp_path):
    from scratch_diffusion.compare_report import weak_judge
    from scratch_diffusion.tracking import MIN_JUDGE_ACCURACY

    rows = [row("ddim-50", 60.0, 3.0, 0.05), row("heun-15", 90.0, 1.0, 0.02)]
    reps = {"ddim-50": {"fid": np.linspace(58, 62, 10)}, "heun-15": {"fid": np.linspace(88, 92, 10)}}
    summary = summarise(rows, reps, floor=12.0)
    said = weak_judge(0.74, MIN_JUDGE_ACCURACY)
    assert said.startswith("A weak judge: the classifier behind FID, recognised and coverage has test accuracy 74.0%")
    assert weak_judge(0.99, MIN_JUDGE_ACCURACY) == "" and weak_judge(None, MIN_JUDGE_ACCURACY) == ""
    context = {"n": 6, "classifier_accuracy": 0.74, "num_classes": 3, "real_recognised": 0.9, "no_classifier": None}
    write_report(rows, summary, {**context, "weak_judge": said}, {}, tmp_path / "compare.md", tmp_path / "c.html")
    lines = (tmp_path / "compare.md").read_text().splitlines()
    assert lines[2] == f"**{said}**" and lines[4].startswith("Best setting: **ddim-50**")
    assert [line.count("(weak judge)") for line in lines if line.startswith("| ddim-50 |")] == [1]
    assert "(weak judge)" in (tmp_path / "c.html").read_text()
    # A judge above the bound (MNIST's): the report as it was, no mark anywhere.
    write_report(rows, summary, {**context, "classifier_accuracy": 0.99}, {}, tmp_path / "ok.md", tmp_path / "ok.html")
    assert "weak" not in (tmp_path / "ok.md").read_text()


def test_classes_are_named_as_the_dataset_names_them_in_the_report_and_the_grid(tmp_path):
    from PIL import Image

    from scratch_diffusion.compare_report import plot_class_grid

    cond = conditional_row("ddim-50-g3") | {
        "fid_per_class": {"Food & Drink": 70.0, "été": 81.5},
        "cond_accuracy_per_class": {"Food & Drink": 0.9, "a|b": 0.25, "été": 0.5},  # a|b: too few real images
    }
    summary = summarise([cond], {"ddim-50-g3": {"fid": np.full(10, 70.0)}}, floor=12.0)
    context = {"n": 6, "classifier_accuracy": 0.95, "num_classes": 3, "real_recognised": 0.9, "no_classifier": None}
    write_report([cond], summary, context, {}, tmp_path / "compare.md", tmp_path / "compare.html")
    report = (tmp_path / "compare.md").read_text()
    assert "## Per class: ddim-50-g3" in report
    assert "| Food & Drink | 0.900 | 70.00 |" in report and "| a\\|b | 0.250 |  |" in report
    assert "| été | 0.500 | 81.50 |" in report
    assert "<td>Food &amp; Drink</td>" in (tmp_path / "compare.html").read_text(encoding="utf-8")
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 2] * 6)
    plot_class_grid(images, labels, tmp_path / "classes.png", ["Food & Drink", "été"], "two classes asked for")
    with Image.open(tmp_path / "classes.png") as img:
        assert img.width > img.height > 0
