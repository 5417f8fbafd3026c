"""apps/cost.py: the app's cost estimates (measured unit costs x pixels x steps) and the budget that refuses a
request before it starts."""

from __future__ import annotations

import time

import pytest

from apps.cost import Costs, check_budget, generate_seconds, measure, protect_seconds, tiled_pixels
from apps.jobs import duration
from protect import Finetune


def test_estimates_grow_in_proportion_to_pixels_and_steps():
    costs = Costs("cpu")
    assert costs.measure("pgd_pixel_step:photoguard", lambda: None, units=128 * 128) >= 0
    costs.unit.update({"pgd_pixel_step:photoguard": 1e-5, "amortized_pixel": 1e-7, "preview": 2.0, "generate:m": 0.01})
    assert tiled_pixels(256, 256, 128) == 256 * 256 and tiled_pixels(130, 20, 128) == 256 * 20
    # a 2 px strip ran 4.8x the time per pixel of square crops: its crops count as 16 px thick (8x)
    assert tiled_pixels(32768, 2, 128) == 32768 * 16 >= 4.8 * 32768 * 2
    small = protect_seconds(costs, [(128, 128)], "photoguard", 10, 128, preview=False)
    big = protect_seconds(costs, [(1024, 1024)], "photoguard", 10, 128, preview=False)
    assert small == pytest.approx(128 * 128 * 10 * 1e-5) and big == pytest.approx(64 * small)
    assert protect_seconds(costs, [(64, 64)] * 2, "amortized", 50, 128, preview=True) == pytest.approx(
        2 * (64 * 64 * 1e-7 + 2.0)
    )
    assert protect_seconds(costs, [(64, 64)], "amortized-full", 50, 128, preview=False) == pytest.approx(64 * 64 * 1e-7)
    tiles_and_halos = (2 * (1024 + 40)) ** 2  # 2048 px: four 1024 px tiles, each with a 40 px halo inside
    assert protect_seconds(costs, [(2048, 2048)], "amortized", 1, 128, preview=False) == pytest.approx(
        tiles_and_halos * 1e-7
    )
    costs.unit["survival_pixel"] = 1e-6  # the survival report, per pixel of its crops
    assert protect_seconds(costs, [(1024, 1024)], "photoguard", 10, 128, preview=False) == pytest.approx(
        big + 1024 * 1024 * 1e-6
    )
    # ASPL: its PGD steps plus two fine-tunes of ``steps`` steps per round of ``pgd_steps`` PGD steps
    costs.unit.pop("survival_pixel")
    costs.unit.update({"pgd_pixel_step:aspl": 2e-5, "aspl_finetune_pixel": 3e-6})
    rounds_of_6 = protect_seconds(costs, [(256, 256)], "aspl", 13, 128, False, finetune=Finetune(steps=3))
    assert rounds_of_6 == pytest.approx(256 * 256 * (13 * 2e-5 + 3 * 2 * 3 * 3e-6))  # 13 steps: 3 rounds
    costs.unit["report_pixel"] = 1e-7  # the report's PSNR and SSIM, on the whole image
    assert protect_seconds(costs, [(256, 128)], "amortized", 1, 128, preview=False) == pytest.approx(
        256 * 128 * (1e-7 + 1e-7)
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
