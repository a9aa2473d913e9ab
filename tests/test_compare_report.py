"""The compare report's summary: the best setting, the verdict of every other against it, the cheapest near it."""

import numpy as np

from scratch_diffusion.compare_report import markdown_table, summarise, summary_text


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
