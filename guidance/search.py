"""HeadHunter: a greedy search for the attention heads whose SoftPAG guidance best serves an objective.

"Fine-Grained Perturbation Guidance via Attention Head Selection" (HeadHunter, 2025). With ``J(S)`` the mean
objective over the images generated (same prompts, same seeds) with SoftPAG on the head set ``S``, each round
scores every remaining candidate head ``h`` on ``S ∪ {h}`` and keeps the ``k`` best that improve on ``S``:

    S_{r+1} = S_r ∪ top_k { h ∉ S_r : J(S_r ∪ {h}) > J(S_r) },    S_0 = ∅ (the images without SoftPAG)

until ``rounds`` rounds are done or no candidate improves. The objective is pluggable: any
``objective(images, prompts) -> per-image scores`` (higher is better); :func:`clip_score`,
:func:`classifier_confidence` and :func:`feature_distance` are built in. For class-conditional pipelines
(DiT) the prompts are class names. Scores are cached per head set, optionally in a JSON Lines file so that
an interrupted search resumes where it stopped. :func:`save_heads` writes the ranking that
:meth:`guidance.SoftPAG.from_json` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from .layers import Selector, self_attention_layers
from .method import Guidance, check_real
from .pag import SoftPAG
from .perturbation import heads_by_layer
from .pipeline import family_of, guide

Head = tuple[str, int]
Images = Tensor | Sequence[Image.Image]
#: ``objective(images, prompts)``: per-image scores (N,), higher is better
Objective = Callable[[Images, list[str]], Tensor]
#: ``call_kwargs(pipe, prompts)``: the ``pipe(...)`` arguments that generate one image per prompt
CallKwargs = Callable[[Any, list[str]], Mapping[str, Any]]
_OWN_ARGUMENTS = ("generator", "num_inference_steps", "output_type")


@dataclasses.dataclass(frozen=True)
class HeadScore:
    """A selected head, the round (from 0) that added it, and its score ``J(S_round ∪ {head})``."""

    layer: str
    head: int
    score: float
    round: int


# --------------------------------------------------------------------------- the search


def headhunter(
    pipe: Any,
    prompts: Sequence[str],
    objective: Objective,
    *,
    scale: float = 3.0,
    strength: float = 1.0,
    rounds: int = 3,
    heads_per_round: int = 8,
    candidates: Iterable[tuple[Selector, int]] | None = None,
    base_methods: Sequence[Guidance] = (),
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    cache: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    call_kwargs: CallKwargs | None = None,
) -> list[HeadScore]:
    """Greedily select the heads whose ``SoftPAG(scale, heads=..., strength=strength)`` maximises ``objective``.

    Args:
        pipe: a pipeline :func:`guidance.guide` serves.
        prompts: text prompts, or class names for class-conditional pipelines; one image each.
        objective: ``objective(images, prompts)``: images as a float (N, 3, H, W) batch in [0, 1], per-image
            scores (N,) back; the search maximises their mean.
        scale, strength: SoftPAG's scale ``s`` and strength ``u`` during the search; the heads found can be
            used later at any scale and strength with ``SoftPAG.from_json``.
        rounds, heads_per_round: at most ``rounds`` rounds adding up to ``heads_per_round`` heads each (the
            defaults give the paper's 24 heads for SD3).
        candidates: ``(layer selector, head)`` pairs, see :mod:`guidance.layers`; default: every head of every
            self-attention layer of the denoiser.
        base_methods: guidance applied in every evaluation too (e.g. ``CFG(3.0)``).
        num_inference_steps: ``None``: the pipeline's default.
        seed: prompt ``i`` is generated with ``torch.Generator().manual_seed(seed + i)`` in every evaluation.
        batch_size: prompts per pipeline call.
        cache: a JSON Lines file of the evaluated head sets: reused when ``resume``, else overwritten. A file
            made with other settings is refused (the objective is only compared by name).
        progress: show a tqdm bar per round.
        call_kwargs: ``call_kwargs(pipe, prompts)`` gives the pipeline arguments for a list of prompts;
            default :func:`prompt_kwargs`.

    Returns:
        The selected heads in the order they were added (best first within a round).
    """
    prompts = _check_prompts(prompts)
    _check_counts(rounds=rounds, heads_per_round=heads_per_round, batch_size=batch_size)
    if num_inference_steps is not None:
        _check_counts(num_inference_steps=num_inference_steps)
    if not callable(objective):
        raise TypeError(f"objective must be a callable objective(images, prompts), got {type(objective).__name__}")
    check_real("scale", scale)
    check_real("strength", strength, low=0.0, high=1.0)
    pool = candidate_heads(pipe, candidates)
    settings = {
        "pipeline": type(pipe).__name__,
        "prompts": prompts,
        "objective": getattr(objective, "__qualname__", type(objective).__name__),
        "scale": scale,
        "strength": strength,
        "base_methods": [method.to_dict() for method in base_methods],
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        # what else decides the images: the call's own arguments (guidance scale, size, negative prompt...) and
        # which model and scheduler answer them
        "call": _describe((call_kwargs or prompt_kwargs)(pipe, list(prompts))),
        "model": getattr(pipe, "name_or_path", None),
        "scheduler": [type(pipe.scheduler).__name__, _describe(dict(pipe.scheduler.config))],
    }
    scores = _Cache(cache, settings, resume)

    def score(heads: frozenset[Head]) -> float:
        if heads not in scores:
            methods = tuple(base_methods)
            if heads:
                methods += (SoftPAG(scale, heads=tuple(sorted(heads)), strength=strength),)
            images = _generate(pipe, methods, prompts, call_kwargs, num_inference_steps, seed, batch_size)
            scores[heads] = _mean_score(objective(images, prompts), len(prompts))
        return scores[heads]

    return _greedy(pool, score, rounds, heads_per_round, progress)


def _greedy(
    pool: list[Head], score: Callable[[frozenset[Head]], float], rounds: int, k: int, progress: bool
) -> list[HeadScore]:
    selected: list[HeadScore] = []
    chosen: frozenset[Head] = frozenset()
    for r in range(rounds):
        best = score(chosen)  # cached when the last round added one head
        remaining = [head for head in pool if head not in chosen]
        bar = tqdm(remaining, desc=f"HeadHunter round {r + 1}/{rounds}", disable=not progress, leave=False)
        trial = {head: score(chosen | {head}) for head in bar}
        better = sorted((head for head in remaining if trial[head] > best), key=trial.__getitem__, reverse=True)
        if not better:
            break
        selected += [HeadScore(layer, head, trial[layer, head], r) for layer, head in better[:k]]
        chosen = chosen.union(better[:k])
    return selected


def candidate_heads(pipe: Any, candidates: Iterable[tuple[Selector, int]] | None = None) -> list[Head]:
    """The ``(layer name, head)`` pairs that ``candidates`` select in ``pipe``'s denoiser (default: all heads)."""
    layers = self_attention_layers(getattr(pipe, family_of(pipe).denoiser))
    if candidates is None:
        candidates = [(name, head) for name, module in layers.items() for head in range(module.heads)]
    candidates = list(candidates)
    if not candidates:
        raise ValueError("HeadHunter needs at least one candidate (layer, head) pair")
    pairs = SoftPAG(1.0, heads=candidates).heads  # validated as SoftPAG validates them
    return [(name, head) for name, heads in heads_by_layer(layers, pairs).items() for head in heads]


def prompt_kwargs(pipe: Any, prompts: list[str]) -> dict[str, Any]:
    """``pipe(...)`` arguments for ``prompts``: class labels for pipelines with ``get_label_ids`` (DiT), else text."""
    if hasattr(pipe, "get_label_ids"):
        return {"class_labels": pipe.get_label_ids(prompts)}
    return {"prompt": prompts}


def _generate(
    pipe: Any,
    methods: tuple[Guidance, ...],
    prompts: list[str],
    call_kwargs: CallKwargs | None,
    num_inference_steps: int | None,
    seed: int,
    batch_size: int,
) -> Tensor:
    """One image per prompt, prompt ``i`` from seed ``seed + i``, as a (N, 3, H, W) batch in [0, 1]."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        kwargs = dict((call_kwargs or prompt_kwargs)(pipe, chunk))
        if clash := sorted(set(kwargs) & set(_OWN_ARGUMENTS)):
            raise ValueError(f"call_kwargs must not set {clash}: HeadHunter sets them")
        kwargs["generator"] = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        kwargs["output_type"] = "pt"
        if num_inference_steps is not None:
            kwargs["num_inference_steps"] = num_inference_steps
        with guide(pipe, *methods) if methods else contextlib.nullcontext():
            images.append(pipe(**kwargs).images)
    return torch.cat(images)


def _describe(value: Any) -> Any:
    """A JSON form of ``value`` for the cache's settings: tensors by shape, dtype and a hash of their values."""
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, Tensor):
        data = value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return f"tensor{tuple(value.shape)}:{value.dtype}:{hashlib.sha256(data).hexdigest()[:16]}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def _mean_score(scores: Any, n: int) -> float:
    scores = torch.as_tensor(scores).detach().float()
    if scores.shape != (n,):
        raise ValueError(f"the objective must return one score per image, shape ({n},), got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"the objective returned non-finite scores: {scores.tolist()}")
    return scores.mean().item()


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of prompts, not one str")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
    return prompts


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class _Cache(dict[frozenset[Head], float]):
    """Scores of evaluated head sets, mirrored in a JSON Lines file: the settings, then one set per line."""

    def __init__(self, path: str | Path | None, settings: dict[str, Any], resume: bool) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)
        if self.path is None:
            return
        lines = self.path.read_text().splitlines() if resume and self.path.exists() else []
        if lines and not _is_json(lines[-1]):  # a line cut short by an interruption
            lines.pop()
        if not lines:
            lines = [json.dumps({"settings": settings})]
        stored = json.loads(lines[0])["settings"]
        if stored != json.loads(json.dumps(settings)):
            raise ValueError(
                f"the cache {self.path} was made with other settings ({stored}); pass resume=False or another path"
            )
        self.path.write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            item = json.loads(line)
            super().__setitem__(frozenset((layer, head) for layer, head in item["heads"]), item["score"])

    def __setitem__(self, heads: frozenset[Head], score: float) -> None:
        super().__setitem__(heads, score)
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(json.dumps({"heads": sorted(heads), "score": score}) + "\n")


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def save_heads(path: str | Path, ranked: Iterable[HeadScore]) -> None:
    """Write ``{"heads": [{"layer", "head", "score", "round"}, ...]}``, which ``SoftPAG.from_json`` loads."""
    Path(path).write_text(json.dumps({"heads": [dataclasses.asdict(h) for h in ranked]}, indent=2) + "\n")


# --------------------------------------------------------------------------- objectives


def as_batch(images: Images) -> Tensor:
    """Images as a float (N, 3, H, W) batch in [0, 1]; PIL images are converted."""
    if isinstance(images, Tensor):
        return images.float()
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _to_pil(batch: Tensor) -> list[Image.Image]:
    pixels = (batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def _on_model(x: Tensor, fn: Callable[..., Any]) -> Tensor:
    """``x`` on the device and in the dtype of the module ``fn`` is (or is a method of), if any."""
    module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    parameter = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    return x if parameter is None else x.to(parameter.device, parameter.dtype)


def clip_score(model: str | Path | Any, processor: Any = None) -> Objective:
    """CLIP score ``100 cos(E_image, E_text)`` of each image with its prompt (Hessel et al. 2021, unclamped).

    ``model``: a ``transformers.CLIPModel`` (then pass its ``CLIPProcessor``) or a hub id / local path that
    both are loaded from with ``from_pretrained``.
    """
    from transformers import CLIPModel, CLIPProcessor

    if isinstance(model, (str, Path)):
        processor = processor or CLIPProcessor.from_pretrained(model)
        model = CLIPModel.from_pretrained(model, use_safetensors=True).eval()  # never a pickled checkpoint
    elif processor is None:
        raise ValueError("clip_score(model) with a model object needs its processor too")

    @torch.no_grad()
    def score(images: Images, prompts: list[str]) -> Tensor:
        inputs = processor(
            text=list(prompts), images=_to_pil(as_batch(images)), return_tensors="pt", padding=True, truncation=True
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model(**inputs)
        return 100 * (output.image_embeds * output.text_embeds).sum(-1).float()

    return score


def classifier_confidence(classifier: Callable[[Tensor], Tensor], class_names: Sequence[str]) -> Objective:
    """The probability that ``classifier`` (images in [-1, 1] to logits) gives each image's prompt, a class name."""
    index = {name: i for i, name in enumerate(class_names)}

    @torch.no_grad()
    def score(images: Images, prompts: list[str]) -> Tensor:
        if unknown := [p for p in prompts if p not in index]:
            raise ValueError(f"prompts {unknown} are none of the class names {list(index)}")
        probabilities = classifier(_on_model(as_batch(images) * 2 - 1, classifier)).float().softmax(-1)
        labels = torch.tensor([index[p] for p in prompts], device=probabilities.device)
        return probabilities.gather(1, labels[:, None]).squeeze(1)

    return score


def feature_distance(feature_fn: Callable[[Tensor], Tensor], target_features: Tensor) -> Objective:
    """Minus the Euclidean distance between ``feature_fn`` of each image (in [-1, 1]) and the target features.

    ``target_features``: (D,) for one target, or (N, D) with a target per prompt.
    """
    if target_features.ndim not in (1, 2):
        raise ValueError(f"target_features must be (D,) or (N, D), got shape {tuple(target_features.shape)}")
    target = target_features.detach().float().reshape(-1, target_features.shape[-1])

    @torch.no_grad()
    def score(images: Images, prompts: list[str]) -> Tensor:
        features = feature_fn(_on_model(as_batch(images) * 2 - 1, feature_fn)).float().flatten(1)
        return -(features - target.to(features.device)).norm(dim=1)

    return score
