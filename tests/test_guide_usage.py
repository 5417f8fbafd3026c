"""guide() the way diffusers users run pipelines: intervals over the steps a call runs, offload, compile,
shared components, callbacks (issue #14)."""

from __future__ import annotations

import dataclasses
import math

import diffusers
import pytest

from guidance import CFG, guide
from tests.factories import BUILDERS
from tests.test_pipeline import recording, run

_CACHE: dict[str, object] = {}


def fresh(name):
    return BUILDERS[name]()


@dataclasses.dataclass(frozen=True)
class CountingCFG(CFG):
    """CFG that records each step it acts on."""

    log: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def update(self, pred_cond, pred_other, state=None):
        self.log.append(1)
        return super().update(pred_cond, pred_other, state)


# --- item 5: guidance intervals count the denoising steps the call actually runs ---


@pytest.mark.parametrize(
    ("name", "scheduler", "extra", "expected_steps"),
    [
        ("sd_img2img", "DDIMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "PNDMScheduler", {"strength": 0.5, "num_inference_steps": 8}, None),
        ("sd_img2img", "DDPMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "EulerDiscreteScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "DPMSolverMultistepScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "HeunDiscreteScheduler", {"strength": 0.5, "num_inference_steps": 4}, None),
        ("sd", "DDIMScheduler", {"num_inference_steps": 4}, 4),
        ("sdxl", None, {"denoising_end": 0.5, "num_inference_steps": 4}, 2),
        ("sdxl_img2img", None, {"denoising_start": 0.5, "num_inference_steps": 4}, 2),
        ("sdxl_img2img", "DDIMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd3_img2img", None, {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("flux", None, {"num_inference_steps": 4}, 4),
    ],
)
@pytest.mark.parametrize(("start", "stop"), [(0.0, 0.5), (0.5, 1.0)])
def test_interval_counts_the_steps_the_call_runs(name, scheduler, extra, expected_steps, start, stop):
    pipe = fresh(name)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    method = CountingCFG(5.0, start=start, stop=stop)
    with recording(pipe) as (calls, _), guide(pipe, method):
        run(pipe, **extra)
    evaluations = len(calls) // (2 if name == "flux" else 1)  # FLUX's true CFG: two calls per step
    if expected_steps is not None:
        assert evaluations == expected_steps
    # step i of n is guided when start <= i / n < stop
    assert len(method.log) == math.ceil(stop * evaluations) - math.ceil(start * evaluations)
