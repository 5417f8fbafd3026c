"""steerguard.protect: protection of images against mimicry, and adversarial input detection.

* :func:`protect` — PhotoGuard / Mist / SDS (Diff-Protect) perturbations by batched L-inf PGD
  against any diffusers ``AutoencoderKL``, with budget and range invariants and an invisibility report;
* :class:`EPSDetector` — EPS-AD (Expected Perturbation Score + deep-kernel MMD) detection.
"""

from .detector import EPSDetector, EPSDetectorConfig
from .eps import expected_perturbation_score
from .protect import ProtectionReport, protect

__all__ = ["EPSDetector", "EPSDetectorConfig", "ProtectionReport", "expected_perturbation_score", "protect"]
