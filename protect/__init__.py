"""steerguard.protect: protection of images against mimicry, and adversarial input detection.

* :func:`protect` — PhotoGuard / Mist / SDS (Diff-Protect) perturbations by batched L-inf PGD
  against any diffusers ``AutoencoderKL``, with budget and range invariants and an invisibility report,
  and ``method="amortized"``: a pre-trained :class:`AmortizedProtector` (FastProtect-style, one forward pass),
  ``method="aspl"``: Anti-DreamBooth's ASPL against fine-tuning (:mod:`protect.aspl`, :class:`Finetune`);
* :func:`evaluate` — mimic clean and protected images (SDEdit, LoRA fine-tune) before and after purification
  (JPEG, resize, noise, blur, noisy upscaling; DiffPure and IMPRESS from :mod:`protect.purifiers`) and measure
  the damage against the invisibility and same-budget random noise, worst case over purifications
  (``protect.evaluate``); :func:`protect.survival.report` — does a protection survive JPEG q75 and noisy
  upscaling, per image;
* :class:`EPSDetector` — EPS-AD (Expected Perturbation Score + deep-kernel MMD) detection, and
  :class:`PatchEPSDetector` — the same on native-resolution patches of images of any size (``protect.patches``).

Training an amortized protector: ``python -m protect.train --images DIR`` (``accelerate launch`` for several GPUs;
``python -m apps.train_protector`` on the demo shapes).
"""

from .amortized import AmortizedProtector
from .aspl import Finetune
from .detector import EPSDetector, EPSDetectorConfig
from .eps import expected_perturbation_score
from .evaluate import evaluate
from .patches import ImageScore, PatchEPSDetector
from .pgd import Cancelled
from .protect import AMORTIZED_BUDGETS, ProtectionReport, Step, protect

__all__ = [
    "AMORTIZED_BUDGETS",
    "AmortizedProtector",
    "Cancelled",
    "EPSDetector",
    "EPSDetectorConfig",
    "Finetune",
    "ImageScore",
    "PatchEPSDetector",
    "ProtectionReport",
    "Step",
    "evaluate",
    "expected_perturbation_score",
    "protect",
]
