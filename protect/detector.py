"""EPS-AD: adversarial input detection with the Expected Perturbation Score and a deep-kernel MMD
(Zhang et al., ICML 2023; official code ZSHsh98/EPS-AD).

``fit`` computes the EPS (:mod:`.eps`) of clean and adversarial training images, trains a deep kernel for
test power on them (Liu et al. 2020, :mod:`.mmd`), keeps a reference set of clean EPS and sets the threshold
at the ``1 - fpr`` quantile of the scores of held-out clean images. ``score`` is each image's ``MMD^2`` to the
reference set (the official per-sample ``MMD_batch``): higher means more adversarial. The diffusion model is
passed in, never loaded here, and is not part of what :meth:`EPSDetector.save_pretrained` writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .eps import ValueRange, as_denoiser, expected_perturbation_score, signed_images
from .metrics import threshold_at_fpr
from .mmd import DeepKernel, conv_featurizer, mmd2_per_sample, train_kernel

CONFIG_NAME, WEIGHTS_NAME, FORMAT = "config.json", "detector.safetensors", "steerguard.eps_detector/1"

#: on a GPU, the pixels of the score model's evaluations in one forward pass (evaluations x height x width) that
#: EPS is computed with at least: the configured ``batch_size`` (256, chosen on the CPU, where batching gives
#: nothing) ran at half the per-level loop's speed on an H200, 2560 16x16 evaluations per pass 2.2x faster than
#: the loop at 1.2 GiB with the demo score model (benchmarks/RESULTS.md, 2026-12-04). EPS does not depend on it.
GPU_PIXELS_PER_PASS = 2560 * 16 * 16


def evaluations_per_pass(configured: int, device: torch.device, height: int, width: int) -> int:
    """Score-model evaluations per forward pass: ``configured`` on the CPU; on a GPU at least as many as make
    :data:`GPU_PIXELS_PER_PASS` pixels (bounded in pixels: larger images take fewer per pass)."""
    if torch.device(device).type != "cuda":
        return configured
    return max(configured, GPU_PIXELS_PER_PASS // (height * width))


@dataclass(frozen=True, kw_only=True)
class EPSDetectorConfig:
    """EPS levels (``timesteps``, ``t_max``, ``antithetic`` noise pairs, noise ``seed``), kernel training,
    reference set and calibration."""

    timesteps: int = 20
    t_max: float | None = None
    antithetic: bool = False
    seed: int = 0
    batch_size: int = 256
    reference_size: int = 500
    calibration_fraction: float = 0.25
    fpr: float = 0.05
    epochs: int = 200
    lr: float = 5e-4
    kernel_batch_size: int = 100
    channels: tuple[int, ...] = (16, 32)
    feature_dim: int = 300
    patch_size: int | None = None  # PatchEPSDetector: the patch side (default: the score model's sample_size)
    max_patches: int = 256  # PatchEPSDetector: patches scored per image at most (a seeded sample past it)
    fit_patches: int = 32  # PatchEPSDetector: patches per training image for the kernel and the reference set

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("timesteps", "batch_size", "reference_size", "kernel_batch_size", "feature_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if "size" in name else 1):
                raise ValueError(f"{name} must be an int >= {2 if 'size' in name else 1}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {self.epochs!r}")
        if not 0 < self.fpr < 1 or not 0 < self.calibration_fraction < 1 or not self.lr > 0:
            raise ValueError("fpr and calibration_fraction must lie in (0, 1) and lr be positive")
        if not isinstance(self.antithetic, bool) or (self.antithetic and self.timesteps % 2):
            raise ValueError(f"antithetic must be a bool, and needs an even number of timesteps ({self.timesteps})")
        if self.t_max is not None and not 0 < self.t_max <= 1:
            raise ValueError(f"t_max must lie in (0, 1], got {self.t_max}")
        for name in ("max_patches", "fit_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.patch_size is not None and (
            isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 2
        ):
            raise ValueError(f"patch_size must be an int >= 2 or None, got {self.patch_size!r}")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive ints, got {self.channels!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EPSDetectorConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown EPSDetectorConfig keys: {sorted(unknown)}")
        return cls(**data)


class EPSDetector:
    """EPS-AD detector with scikit-learn-like ``fit`` / ``score`` / ``predict``.

    Args:
        model: a VP :class:`~guidance.denoisers.DiffusersDenoiser`, or a diffusers model with ``scheduler``.
        scheduler: the model's scheduler (or its config) when ``model`` is not a denoiser.
        config: an :class:`EPSDetectorConfig`; keyword ``overrides`` replace its fields.

    Every image draws the same EPS noise (from ``config.seed``), so a score depends on the image alone: not on
    its position in the batch, the batch size or the other images. Images are ``[-1, 1]`` unless a method is
    given ``value_range=(0, 1)``; a batch without negative values is refused as ambiguous (see
    :func:`~protect.eps.signed_images`). The kernel stays in float32 whatever the input's dtype.
    """

    format = FORMAT  # the "format" of the saved config.json

    def __init__(self, model: Any, scheduler: Any = None, config: EPSDetectorConfig | None = None, **overrides: Any):
        self.denoiser = as_denoiser(model, scheduler)
        base = (config or EPSDetectorConfig()).to_dict()
        self.config = EPSDetectorConfig.from_dict({**base, **overrides})
        self.kernel: DeepKernel | None = None
        self.reference: Tensor | None = None
        self.threshold: float | None = None
        self.calibration_scores: Tensor | None = None
        self.benign_calibration: dict[str, dict[str, float]] = {}  # change -> {"n", "threshold"}
        # the weights' fingerprint as fitted (or as loaded and checked): saved as is, so that casting the score
        # model to another dtype for scoring after the fit does not change what a loader checks against
        self.fingerprint: str | None = None
        self.diffusion_model: str | None = None

    def eps(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """The EPS of ``images`` with this detector's levels and seeds; ``batch_size`` evaluations per pass (default
        ``config.batch_size``, more on a GPU: :func:`evaluations_per_pass`; the result does not depend on it)."""
        c = self.config
        if batch_size is None:
            batch_size = evaluations_per_pass(c.batch_size, images.device, *images.shape[-2:])
        return expected_perturbation_score(
            self.denoiser,
            images,
            timesteps=c.timesteps,
            t_max=c.t_max,
            generator=c.seed,
            batch_size=batch_size,
            antithetic=c.antithetic,
        )

    def fit(
        self,
        clean: Tensor,
        adversarial: Tensor,
        *,
        generator: torch.Generator | None = None,
        value_range: ValueRange = None,
    ) -> EPSDetector:
        """Train the kernel on clean vs adversarial EPS, keep the reference set, calibrate the threshold.

        ``generator`` (seed 0 if none) splits the clean images into training and calibration parts and
        initialises and trains the kernel.
        """
        c = self.config
        clean = signed_images(clean, value_range, "clean images")
        adversarial = signed_images(adversarial, value_range, "adversarial images")
        if clean.shape[1:] != adversarial.shape[1:]:
            raise ValueError(f"clean {tuple(clean.shape[1:])} and adversarial {tuple(adversarial.shape[1:])} differ")
        n_cal = max(2, round(c.calibration_fraction * len(clean)))
        if len(clean) - n_cal < 2 or len(adversarial) < 2:
            raise ValueError(
                f"too few samples: need >= {n_cal + 2} clean ({n_cal} held out for calibration) and >= 2 adversarial"
                f" images, got {len(clean)} and {len(adversarial)}"
            )
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(len(clean), generator=generator).to(clean.device)
        clean_eps, adversarial_eps = self.eps(clean)[order], self.eps(adversarial)
        calibration, train = clean_eps[:n_cal], clean_eps[n_cal:]
        self.fit_kernel(train, adversarial_eps, generator)
        self.reference = train[: c.reference_size].detach()
        with torch.no_grad():
            self.set_threshold(mmd2_per_sample(self.reference, calibration, self.kernel))
        self.fingerprint = model_fingerprint(self.denoiser.model)  # the weights it was fitted with
        return self

    def fit_kernel(self, clean_eps: Tensor, adversarial_eps: Tensor, generator: torch.Generator) -> DeepKernel:
        """Train a new deep kernel (the config's architecture and schedule) on clean vs adversarial EPS."""
        c = self.config
        featurizer = conv_featurizer(
            clean_eps.shape[1], channels=c.channels, feature_dim=c.feature_dim, generator=generator
        )
        self.kernel = train_kernel(
            clean_eps,
            adversarial_eps,
            kernel=DeepKernel(featurizer),
            epochs=c.epochs,
            lr=c.lr,
            batch_size=c.kernel_batch_size,
            generator=generator,
        )
        return self.kernel

    def set_threshold(self, clean_scores: Tensor, benign: Mapping[str, Tensor] | None = None) -> float:
        """Calibrate: the threshold becomes the ``1 - fpr`` quantile of held-out clean ``clean_scores`` (kept as
        ``calibration_scores``), or with ``benign`` (the scores of held-out clean images after each benign change,
        e.g. ``{"jpeg75": ..., "noise2": ...}``) the highest of that quantile and each change's: the false-positive
        rate then holds, on the calibration images, for clean images and for every named change (each change's
        own threshold and count are kept as ``benign_calibration``)."""
        quantiles = {}
        for name, scores in {"clean": clean_scores, **dict(benign or {})}.items():
            scores = torch.as_tensor(scores).detach().double().cpu().flatten()
            if len(scores) == 0 or not scores.isfinite().all():
                raise ValueError(f"calibration needs at least one finite score ({name})")
            quantiles[name] = (scores, threshold_at_fpr(scores, self.config.fpr))
        self.threshold = max(q for _, q in quantiles.values())
        self.calibration_scores = quantiles.pop("clean")[0]
        self.benign_calibration = {name: {"n": len(v), "threshold": q} for name, (v, q) in quantiles.items()}
        return self.threshold

    @torch.no_grad()
    def score(self, images: Tensor, *, value_range: ValueRange = None) -> Tensor:
        """Each image's ``MMD^2`` between its EPS and the clean reference EPS, ``(N,)``; higher = more adversarial."""
        if self.kernel is None or self.reference is None:
            raise RuntimeError("the detector is not fitted: call fit() or from_pretrained() first")
        images = signed_images(images, value_range)
        if images.shape[1:] != self.reference.shape[1:]:
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])}, the detector was fitted on "
                f"{tuple(self.reference.shape[1:])}"
            )
        kernel, eps = self.kernel_and(self.eps(images))
        return mmd2_per_sample(self.reference.to(eps), eps, kernel)

    def kernel_and(self, eps: Tensor) -> tuple[DeepKernel, Tensor]:
        """The kernel on ``eps``'s device (its dtype unchanged, float32) and ``eps`` in the kernel's dtype."""
        if self.kernel is None:
            raise RuntimeError("the detector is not fitted: call fit() or from_pretrained() first")
        self.kernel.to(device=eps.device)
        return self.kernel, eps.to(self.kernel.scale.dtype)

    def is_adversarial(self, scores: Tensor | float) -> Tensor | bool:
        """The detector's decision on scores of :meth:`score`: ``True`` above the calibrated threshold (a bool
        tensor for a tensor of scores, a ``bool`` for one score)."""
        if self.threshold is None:
            raise RuntimeError("the detector is not calibrated: call fit() or from_pretrained() first")
        return scores > self.threshold

    def verdict(self, score: float) -> str:
        """``"adversarial"`` or ``"clean"``: :meth:`is_adversarial` in words, for one score."""
        return "adversarial" if self.is_adversarial(float(score)) else "clean"

    def predict(self, images: Tensor, *, value_range: ValueRange = None) -> Tensor:
        """``True`` where an image is flagged adversarial (score above the calibrated threshold)."""
        return self.is_adversarial(self.score(images, value_range=value_range))

    def save_pretrained(self, directory: str | Path, *, diffusion_model: str | None = None) -> None:
        """Write ``config.json`` and ``detector.safetensors`` (kernel weights and reference EPS) to ``directory``.

        ``config.json`` also records ``diffusion_model`` (a name or path of the score model the detector needs,
        for loaders; default: the one given to :meth:`from_pretrained`, if any), the ``model_fingerprint`` of the
        diffusion model's weights (checked by :meth:`from_pretrained`) and the ``calibration_scores``.
        """
        if self.kernel is None or self.reference is None or self.threshold is None:
            raise RuntimeError("the detector is not fitted: nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"kernel.{k}": v.detach().cpu().contiguous() for k, v in self.kernel.state_dict().items()}
        save_file({**tensors, "reference": self.reference.detach().cpu().contiguous()}, directory / WEIGHTS_NAME)
        meta: dict[str, Any] = {"format": self.format, "config": self.config.to_dict(), "threshold": self.threshold}
        diffusion_model = diffusion_model if diffusion_model is not None else self.diffusion_model
        if diffusion_model is not None:
            meta["diffusion_model"] = str(diffusion_model)
        meta["model_fingerprint"] = self.fingerprint or model_fingerprint(self.denoiser.model)
        if self.calibration_scores is not None:
            meta["calibration_scores"] = [float(s) for s in self.calibration_scores.double().tolist()]
        if self.benign_calibration:
            meta["benign_calibration"] = self.benign_calibration
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: Any, scheduler: Any = None) -> EPSDetector:
        """Load a detector saved by :meth:`save_pretrained`, around the diffusion ``model`` it was fitted with."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a saved EPSDetector")
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
            tensors = load_file(directory / WEIGHTS_NAME)
        except (json.JSONDecodeError, SafetensorError, OSError) as error:
            raise ValueError(f"corrupt EPSDetector files in {directory}: {error}") from error
        if not isinstance(meta, dict) or meta.get("format") != cls.format:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{directory / CONFIG_NAME} is not a {cls.__name__} config ({cls.format}), got {found!r}")
        detector = cls(model, scheduler, EPSDetectorConfig.from_dict(meta.get("config", {})))
        expected_model, fingerprint = meta.get("diffusion_model"), meta.get("model_fingerprint")
        detector.diffusion_model = str(expected_model) if expected_model is not None else None
        detector.fingerprint = fingerprint if isinstance(fingerprint, str) else None
        if isinstance(fingerprint, str) and fingerprint != model_fingerprint(detector.denoiser.model):
            warnings.warn(
                f"{directory} was fitted with another diffusion model ({expected_model or 'unnamed'}, weights "
                f"fingerprint {fingerprint}); its scores and threshold do not apply to the one given",
                stacklevel=2,
            )
        threshold, reference = meta.get("threshold"), tensors.pop("reference", None)
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ValueError(f"{directory / CONFIG_NAME}: the threshold must be a finite number, got {threshold!r}")
        if reference is None or reference.ndim != 4 or len(reference) < 2:
            raise ValueError(f"{directory / WEIGHTS_NAME}: need a reference EPS set (n >= 2, C, H, W)")
        c = detector.config
        kernel = DeepKernel(conv_featurizer(reference.shape[1], channels=c.channels, feature_dim=c.feature_dim))
        expected = {f"kernel.{k}": v.shape for k, v in kernel.state_dict().items()}
        found = {k: v.shape for k, v in tensors.items()}
        if found != expected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: kernel tensors do not match the config: "
                f"expected {expected}, found {found}"
            )
        kernel.load_state_dict({k.removeprefix("kernel."): v for k, v in tensors.items()})
        # the reference set where the score model runs: moved once here, not per scored image
        device = getattr(getattr(detector.denoiser, "model", None), "device", reference.device)
        detector.kernel, detector.threshold = kernel.eval(), float(threshold)
        detector.reference = reference.to(device)
        calibration = meta.get("calibration_scores")
        if isinstance(calibration, list) and calibration:
            detector.calibration_scores = torch.tensor([float(s) for s in calibration])
        benign = meta.get("benign_calibration")
        if isinstance(benign, dict):
            detector.benign_calibration = {
                str(k): {"n": int(v["n"]), "threshold": float(v["threshold"])}
                for k, v in benign.items()
                if isinstance(v, dict) and {"n", "threshold"} <= v.keys()
            }
        return detector


def model_fingerprint(model: Any) -> str:
    """A short SHA-256 of a model's state dict (names and float32 values), to tell diffusion models apart."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
