"""The DiT sweep harness at a token size: every suite runs, rows carry the seed spread, a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sweep_dit


@pytest.mark.slow
def test_sweep_runs_every_suite_with_seed_spread_and_resumes(tmp_path):
    argv = [
        *("--per-class", "1", "--steps", "2", "--seeds", "2", "--w", "4", "--s", "2", "--real", "100"),
        *("--hunt-samples", "2", "--hunt-rounds", "1", "--hunt-steps", "2"),
        *("--json", str(tmp_path / "sweep.json"), "--figures", str(tmp_path / "figures")),
    ]
    rows = sweep_dit.main(argv)
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    families = {row["family"] for row in rows}
    for family in ("none-2x", "cfg", "apg", "uncond-pag", "cfg-softpag", "uncond-tpg", "uncond-softpag-all", "cfg-slg"):
        assert family in families
    picked = json.loads((tmp_path / "figures" / "sweep_headhunter.json").read_text())["heads"]
    hunted = {"uncond-softpag-headhunter", "uncond-softpag-random"} & families
    assert hunted == ({"uncond-softpag-headhunter", "uncond-softpag-random"} if picked else set())
    for row in rows:
        assert len(row["per_seed"]) == 2 and row["fd_sd"] >= 0 and row["nfe"] > 0
    cfg = next(row for row in rows if row["name"] == "CFG 4")
    assert cfg["nfe"] == 2 * 2 and "accuracy" in cfg
    uncond = next(row for row in rows if row["name"] == "uncond PAG 2")
    assert "accuracy" not in uncond  # unconditional samples have no requested class
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert sweep_dit.main(argv) == rows  # a rerun resumes: nothing left to run
    with pytest.raises(SystemExit, match=r"measured with other settings .*seeds 2 there, 3 now"):
        sweep_dit.main([*argv[:5], "3", *argv[6:]])  # other seeds: never mixed into the same file
    table = sweep_dit.summary_table(rows)
    assert "| APG 4" in table and "baseline at equal NFE" in table and "+ SLG" in table
    sheet = tmp_path / "figures" / "sweep_cfg_4.png"
    measured = sheet.read_bytes()
    sheet.unlink()
    assert sweep_dit.main([*argv, "--sheets", "CFG 4"]) == []  # redrawn: the very samples the sweep measured
    assert sheet.read_bytes() == measured
    with pytest.raises(SystemExit, match="unknown settings"):
        sweep_dit.main([*argv, "--sheets", "CFG 99"])


@pytest.mark.slow
def test_no_layer_sweep_keeps_the_scale_rows_and_drops_the_per_block_ones(tmp_path):
    argv = [
        *("--suite", "perturbation", "--per-class", "1", "--steps", "2", "--seeds", "2", "--s", "1", "--real", "50"),
        *("--json", str(tmp_path / "sweep.json"), "--figures", str(tmp_path / "figures"), "--no-layer-sweep"),
    ]
    names = [row["name"] for row in sweep_dit.main(argv)]
    assert sorted(names) == sorted(f"{kind} {m} 1" for kind in ("uncond", "CFG 3 +") for m in ("PAG", "SoftPAG", "TPG"))


def test_the_revisited_apg_thresholds_are_multiples_of_what_auto_uses():
    """APG with ``norm_threshold=auto_threshold(pipe)`` samples exactly what APG's "auto" samples on the demo DiT,
    so the sweep's "auto r x4" / "x16" rows really are 4 and 16 times the default (an absolute per-element
    threshold there once made them 1/4 of it and the rows looked like no guidance)."""
    import torch

    from apps.services import load_pipeline
    from benchmarks.bench_quality_dit import sample
    from guidance import APG

    pipe = load_pipeline("demo/dit", "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(4)
    r = sweep_dit.auto_threshold(pipe)
    auto = sample(pipe, labels, (APG(8.0),), steps=3)
    explicit = sample(pipe, labels, (APG(8.0, norm_threshold=r),), steps=3)
    looser = sample(pipe, labels, (APG(8.0, norm_threshold=4 * r),), steps=3)
    assert torch.equal(auto, explicit)
    assert (looser - auto).abs().max() > 1e-3  # the threshold binds at w = 8: a looser one changes the samples
    args = sweep_dit.parse_args(["--w", "4", "8"])
    rows = {s.name: s for s in sweep_dit.cfg_apg(pipe, args)}
    assert rows["APG 8 auto r x4"].options["norm_threshold"] == pytest.approx(4 * r)
    assert rows["APG 4 auto r x16"].options["norm_threshold"] == pytest.approx(16 * r)


def test_the_paired_verdict_on_shared_seeds():
    """The committed full sweep: CFG 3 + SoftPAG 2 against CFG 3 with 1.5x steps is "within spread" by the sum
    of the standard deviations, but lower on every one of the shared seeds (gaps 1.77 / 2.81 / 2.45)."""
    rows = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "sweep_dit.json").read_text())["rows"]
    by_name = {row["name"]: row for row in rows}
    gaps = sweep_dit.paired_gaps(by_name["CFG 3 + SoftPAG 2"], by_name["CFG 3, 1.5x steps"])
    assert [round(g, 2) for g in gaps] == [1.77, 2.81, 2.45]
    assert sweep_dit.paired_verdict(gaps) == "yes"
    assert sweep_dit.paired_verdict([g - 2.3 for g in gaps]) == "no difference"
    assert sweep_dit.paired_verdict([-g for g in gaps]) == "worse" and sweep_dit.paired_verdict([1.0]) == "n/a"
    table = sweep_dit.summary_table(rows)
    assert "| CFG 3 + SoftPAG 2 |" in table and "| 1.77 / 2.81 / 2.45 | yes |" in table
