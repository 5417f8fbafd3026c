"""A Langevin corrector between the steps of any pipeline (Song et al. 2021, predictor-corrector sampling).

``guide(pipe, LangevinCorrector(steps=1, snr=0.16))``: before each denoiser
evaluation the noisy sample takes ``steps`` Langevin steps at the current noise
level, ``x <- x + e s(x) + sqrt(2 e) z`` with ``e = 2 (r ||z|| / ||s||)^2``
(Algorithm 4 of the Score SDE paper), where ``s`` is the score of the *guided*
prediction (CFG, APG and perturbations included); the pipeline's scheduler then
steps from the corrected sample. Each corrector step costs one extra denoiser
evaluation of every branch. Noise comes from a generator seeded with ``seed``
at the start of every pipeline call. As in the reference code, the step size
``e`` uses the batch means of ``||z||`` and ``||s||`` (a per-sample ratio does
not keep the noisy marginal, :func:`guidance.samplers.langevin_correct`), so a
corrected image depends on the batch it is drawn in: the same seeds give the
same images for the same batch, not for each image alone. The scheduler must
step from the sample it is given (DDIM, DDPM, Euler, LMS, DPM-Solver multistep,
DEIS, flow-matching Euler); those that restart from a stored sample (UniPC,
Heun, KDPM2, DPM-Solver singlestep, PNDM) are refused.
"""

from __future__ import annotations

import dataclasses

from .method import check_real


@dataclasses.dataclass(frozen=True)
class LangevinCorrector:
    """Langevin corrector steps per noise level, with signal-to-noise ratio ``snr``."""

    steps: int = 1
    snr: float = 0.16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        check_real("snr", self.snr, low=0.0)
        if self.snr == 0:
            raise ValueError("snr must be > 0")
