"""The app's per-request limits without a server: cost estimates and the budget, the job's time limit and
cancellation, progress with an ETA, output folders deleted after their age, and the showcase's rows."""

from __future__ import annotations

import os
import time

import pytest

from apps.cost import Costs, check_budget, generate_seconds, measure, protect_seconds, tiled_pixels
from apps.disk import OutputFolders
from apps.generate import Request, grid, showcase
from apps.jobs import Job, duration
from protect import Cancelled, Step


def test_estimates_grow_in_proportion_to_pixels_and_steps():
    costs = Costs("cpu")
    assert costs.measure("pgd_pixel_step:photoguard", lambda: None, units=128 * 128) >= 0
    costs.unit.update({"pgd_pixel_step:photoguard": 1e-5, "amortized_pixel": 1e-7, "preview": 2.0, "generate:m": 0.01})
    assert tiled_pixels(256, 256, 128) == 256 * 256 and tiled_pixels(130, 20, 128) == 256 * 20
    small = protect_seconds(costs, [(128, 128)], "photoguard", 10, 128, preview=False)
    big = protect_seconds(costs, [(1024, 1024)], "photoguard", 10, 128, preview=False)
    assert small == pytest.approx(128 * 128 * 10 * 1e-5) and big == pytest.approx(64 * small)
    assert protect_seconds(costs, [(64, 64)] * 2, "amortized", 50, 128, preview=True) == pytest.approx(
        2 * (64 * 64 * 1e-7 + 2.0)
    )
    assert generate_seconds(costs, "m", rows=4, images=2, steps=10, branches=3) == pytest.approx(2.4)
    with pytest.raises(KeyError, match="not been measured"):
        costs["generate:other"]


def test_the_budget_refuses_with_a_clear_message_in_no_time():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"about 16 min 40 s .* limit of 1 min 00 s .*--max-seconds.*fewer steps"):
        check_budget(1000.0, 60.0, "protecting 1 image", "use fewer steps")
    assert time.perf_counter() - start < 0.1
    check_budget(1000.0, None, "x", "y")  # no limit
    check_budget(59.0, 60.0, "x", "y")
    assert duration(3.4) == "3 s" and duration(3725) == "1 h 02 min"
    assert measure(lambda: time.sleep(0.01), repeats=1) >= 0.01


def test_job_reports_progress_with_eta_and_stops_at_its_limits():
    shown = []
    job = Job("protect", time_limit=0.2, progress=lambda value, desc: shown.append((value, desc)))
    job.start("protecting a (1/1)")
    job(Step(2, 4, None, 10.0))
    assert shown[-1] == ((2, 4), "protecting a (1/1): step 2/4, about 10 s left")
    time.sleep(0.25)
    with pytest.raises(Cancelled, match=r"time limit of 0 s per request \(while protecting a"):
        job(Step(3, 4, None, 15.0))
    gone = Job("generate", alive=lambda: False)
    with pytest.raises(Cancelled, match="disconnected or pressed Stop"):
        gone.start("generating")
    with pytest.raises(ValueError, match="time_limit"):
        Job("x", time_limit=0)


def test_output_folders_are_deleted_after_their_age(tmp_path):
    folders = OutputFolders(max_age=60, root=tmp_path / "out")
    old, new = folders.new(), folders.new()
    (old / "a.png").write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    assert folders.sweep() == 1 and not old.exists() and new.exists()
    folders.close()
    assert not (tmp_path / "out").exists()


def test_showcase_rows_are_distinct_and_labelled():
    rows = showcase(Request("star", method="apg", scale=8, norm_threshold="off", momentum=-0.5))
    assert [r.describe() for r in rows] == ["no CFG", "cfg 8", "apg 8", "apg 8 (no threshold)"]
    assert [r.describe() for r in showcase(Request("star", method="apg", scale=8, momentum=-0.5))] == [
        "no CFG",
        "cfg 8",
        "apg 8",
    ]  # the chosen method is not repeated
    assert len(showcase(Request("star", method="cfg", scale=3, norm_threshold="off"))) == 3
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        Request("star", norm_threshold=0.0)  # 0 is refused, not read as the default
    with pytest.raises(ValueError, match="'off'"):
        Request("star", norm_threshold="none")
    from PIL import Image

    sheet = grid([Image.new("RGB", (8, 8), "red")] * 4, columns=2, scale=2, labels=["a", "b"])
    assert sheet.size == (32, 2 * (16 + 18))
    assert sheet.getpixel((20, 20)) == (255, 0, 0) and sheet.getpixel((20, 2)) == (255, 255, 255)
    with pytest.raises(ValueError, match="labels"):
        grid([Image.new("RGB", (8, 8))] * 2, columns=1, labels=["a"])


def test_at_most_n_pipelines_stay_cached():
    import torch

    from apps.demo import DEMO_DIR
    from apps.services import cached_pipelines, load_pipeline, set_max_pipelines

    if not (DEMO_DIR / "dit").is_dir():
        pytest.skip("the demo DiT is not in demo_models/")
    try:
        set_max_pipelines(1)
        first = load_pipeline("demo/dit", "cpu", torch.float64)
        assert load_pipeline("demo/dit", "cpu", torch.float64) is first
        load_pipeline("demo/dit", "cpu")
        assert cached_pipelines() == [("demo/dit", "cpu", torch.float32)]
        with pytest.raises(ValueError, match="positive integer"):
            set_max_pipelines(0)
    finally:
        set_max_pipelines(4)
