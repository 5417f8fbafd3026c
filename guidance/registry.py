"""One registry of what a user can choose: guidance methods, weak-model perturbations, schedulers and score samplers.

Each :class:`Entry` describes its inputs the way a ComfyUI node's ``INPUT_TYPES`` does (name, type, default,
range, help) and builds its object from their values; the ``steerguard generate`` options and the app's Generate
tab are built from these entries, never from hand-written lists. Adding a method is its file plus one
:func:`register` call::

    half = lambda values, pipe: CFG(values["scale"] / 2)
    register(Entry("half_cfg", "guidance", (Input("scale", float, 4.0, low=0),), build=half))

Kinds: ``"guidance"`` (CFG-type, one per call), ``"perturbation"`` (weak-model guidance on top),
``"scheduler"`` (a diffusers scheduler swapped in for the call) and ``"score_sampler"`` (annealed Langevin /
predictor-corrector sampling of an unconditional UNet through :class:`~guidance.score_pipeline.ScoreSamplingPipeline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .method import finite

KINDS = ("guidance", "perturbation", "scheduler", "score_sampler")
SOFTPAG_STRENGTH = 0.5  # SoftPAG of the registry: every head of PAG's default layers at half strength

__all__ = [
    "KINDS",
    "SOFTPAG_STRENGTH",
    "Entry",
    "Input",
    "entries",
    "get",
    "inputs",
    "names",
    "register",
    "registered",
    "softpag_heads",
    "unregister",
]


@dataclasses.dataclass(frozen=True)
class Input:
    """One input of an entry: ``type`` is ``float``, ``int``, ``str`` or ``bool``; ``low``/``high`` bound it (both
    given: the app shows a slider), ``positive`` excludes ``low`` itself (a number that must be > ``low``),
    ``choices`` lists the allowed strings, ``optional`` allows ``None`` (meaning "the entry decides", e.g. a family
    default), ``keywords`` are strings a number input also takes ("off")."""

    name: str
    type: type
    default: Any
    _: dataclasses.KW_ONLY
    low: float | None = None
    high: float | None = None
    step: float | None = None
    positive: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    keywords: tuple[str, ...] = ()
    help: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"input name must be an identifier, got {self.name!r}")
        if self.type not in (float, int, str, bool):
            raise ValueError(f"{self.name}: type must be float, int, str or bool, got {self.type!r}")
        if self.positive and self.low is None:
            raise ValueError(f"{self.name}: positive needs the bound low")
        self.check(self.default)

    def check(self, value: Any) -> Any:
        """``value`` converted to :attr:`type`; ``ValueError`` when it is not allowed."""
        if isinstance(value, str) and value in self.keywords:
            return value
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{self.name} is required")
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value):
                raise ValueError(f"{self.name} must be a finite number, got {repr(value)[:40]}")
            if self.type is int and value != int(value):
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            value = self.type(value)
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise ValueError(f"{self.name} must be in [{self.low}, {self.high}], got {value!r}")
            if self.positive and value == self.low:
                raise ValueError(f"{self.name} must be greater than {self.low}, got {value!r}")
            return value
        if not isinstance(value, self.type):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        return value


Build = Callable[[Mapping[str, Any], Any], Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A choice of ``kind`` listed under ``name``; ``build(values, pipe)`` makes its object from the checked
    input values (a guidance method, a scheduler, or a score sampler's options) for the pipeline ``pipe``, and
    raises ``ValueError`` when it cannot serve that pipeline."""

    name: str
    kind: str
    inputs: tuple[Input, ...] = ()
    _: dataclasses.KW_ONLY
    build: Build
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name or self.name in ("none", "default") or any(c.isspace() for c in self.name):
            raise ValueError(f"an entry needs a name without spaces, not 'none' or 'default', got {self.name!r}")
        if len({i.name for i in self.inputs}) != len(self.inputs):
            raise ValueError(f"{self.name}: input names repeat")

    def values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every input's checked value: ``given[name]`` when present (and not ``None`` for a required input),
        else its default."""
        out = {}
        for spec in self.inputs:
            value = given.get(spec.name)
            out[spec.name] = spec.check(spec.default if value is None and not spec.optional else value)
        return out

    def __call__(self, given: Mapping[str, Any], pipe: Any = None) -> Any:
        """The object of this entry for ``pipe``, from the input values ``given`` (defaults for the others).
        Guidance and perturbation entries accept ``pipe=None`` (to validate their values early)."""
        return self.build(self.values(given), pipe)


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(entry: Entry) -> Entry:
    """List ``entry`` (``ValueError`` if its kind already has that name)."""
    table = _ENTRIES[entry.kind]
    if entry.name in table:
        raise ValueError(f"a {entry.kind} named {entry.name!r} is already registered")
    table[entry.name] = entry
    return entry


def unregister(kind: str, name: str) -> None:
    """Remove an entry (``KeyError`` if there is none)."""
    del _ENTRIES[kind][name]


@contextlib.contextmanager
def registered(entry: Entry) -> Iterator[Entry]:
    """``entry`` registered for the block, removed afterwards."""
    register(entry)
    try:
        yield entry
    finally:
        unregister(entry.kind, entry.name)


def entries(kind: str) -> tuple[Entry, ...]:
    """The entries of ``kind``, in registration order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(_ENTRIES[kind].values())


def names(kind: str) -> tuple[str, ...]:
    """The names of the entries of ``kind`` (what the CLI and the app list)."""
    return tuple(entry.name for entry in entries(kind))


def get(kind: str, name: str) -> Entry:
    """The entry ``name`` of ``kind``; ``ValueError`` naming the known ones otherwise."""
    if name not in _ENTRIES.get(kind, {}):
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(names(kind))}")
    return _ENTRIES[kind][name]


def inputs(*kinds: str) -> tuple[Input, ...]:
    """The inputs of every entry of ``kinds``, each name once (its first description)."""
    seen: dict[str, Input] = {}
    for kind in kinds:
        for entry in entries(kind):
            for spec in entry.inputs:
                seen.setdefault(spec.name, spec)
    return tuple(seen.values())


# ----------------------------------------------------------------------------------------------- the entries


def softpag_heads(pipe: Any) -> tuple[tuple[str, int], ...]:
    """All heads of the denoiser's default self-attention layer(s), the layers PAG perturbs by default."""
    from .layers import default_layers, select, self_attention_layers
    from .pipeline import family_of

    denoiser = getattr(pipe, family_of(pipe).denoiser)
    attention = self_attention_layers(denoiser)
    chosen = select(attention, default_layers(attention), "self-attention layer")
    return tuple((name, head) for name, module in chosen.items() for head in range(module.heads))


def _cfg(values: Mapping[str, Any], pipe: Any) -> Any:
    from .cfg import CFG

    return CFG(values["scale"])


def _apg(values: Mapping[str, Any], pipe: Any) -> Any:
    from .apg import APG

    threshold, momentum = values["norm_threshold"], values["momentum"]
    return APG(
        values["scale"],
        eta=values["eta"],
        norm_threshold={None: "auto", "off": None}.get(threshold, threshold),
        momentum="auto" if momentum is None else momentum,
    )


def _perturbation(name: str) -> Build:
    def build(values: Mapping[str, Any], pipe: Any) -> Any:
        from .pag import PAG, SoftPAG
        from .slg import SLG
        from .tpg import TPG

        if name == "softpag":  # the heads depend on the model: without one, a placeholder head validates the rest
            heads = softpag_heads(pipe) if pipe is not None else ((0, 0),)
            return SoftPAG(values["scale"], heads=heads, strength=SOFTPAG_STRENGTH)
        if name == "slg":  # the middle block over the whole run (measured on the demo DiT: benchmarks/RESULTS.md)
            return SLG(values["scale"], layers="auto", start=0.0, stop=1.0)
        return {"pag": PAG, "tpg": TPG}[name](values["scale"])

    return build


def _scheduler(class_name: str) -> Build:
    def build(values: Mapping[str, Any], pipe: Any) -> Any:
        """A new ``class_name`` scheduler from ``pipe``'s scheduler config."""
        import diffusers

        from .prediction import has_log_sigma_timesteps, is_flow_schedule

        config = pipe.scheduler.config
        name = type(pipe.scheduler).__name__
        if is_flow_schedule(name, config):
            raise ValueError("this model samples with flow matching; only the default sampler serves it")
        if name.startswith("EDM") or (has_log_sigma_timesteps(config) and class_name != "EulerDiscreteScheduler"):
            # a DDPM-table scheduler would feed discrete timesteps to a model trained on log-sigma (c_noise)
            raise ValueError(
                f"this model's {name} feeds it log-sigma timesteps (EDM / continuous v-prediction); a "
                f"{class_name} would not: only the default sampler"
                + ("" if name.startswith("EDM") else " or euler")
                + " serves it"
            )
        scheduler = getattr(diffusers, class_name).from_config(config)
        if _family(pipe) == "dit" and float(scheduler.init_noise_sigma) != 1.0:
            raise ValueError("DiTPipeline does not scale its noise for sigma-parameterised samplers")
        return scheduler

    return build


def _family(pipe: Any) -> str | None:
    from .pipeline import family_of

    try:
        return family_of(pipe).name
    except (ValueError, TypeError):
        return None


def _score_sampler(function: str) -> Build:
    def build(values: Mapping[str, Any], pipe: Any) -> dict[str, Any]:
        """``ScoreSamplingPipeline`` options: ``sampler`` and the sampler's own keyword arguments."""
        if pipe is not None and (getattr(pipe, "unet", None) is None or _family(pipe) is not None):
            raise ValueError(f"{function}: score samplers serve unconditional UNet pipelines (e.g. demo/unet) only")
        return {"sampler": function, **{k: v for k, v in values.items() if v is not None}}

    return build


SCALE = Input("scale", float, 4.0, low=0.0, help="guidance scale w")
for _entry in (
    Entry("cfg", "guidance", (SCALE,), build=_cfg, help="classifier-free guidance (Ho & Salimans 2022)"),
    Entry(
        "apg",
        "guidance",
        (
            SCALE,
            Input("eta", float, 0.0, low=0.0, high=1.0, step=0.05, help="weight of the parallel component"),
            Input(
                "norm_threshold",
                float,
                None,
                low=0.0,
                optional=True,
                keywords=("off",),
                help="norm threshold r > 0 (empty: the family default; off: none)",
            ),
            Input("momentum", float, -0.5, low=-0.99, high=0.99, step=0.05, optional=True, help="momentum beta"),
        ),
        build=_apg,
        help="adaptive projected guidance (Sadat et al. 2025)",
    ),
    Entry("pag", "perturbation", (Input("scale", float, 2.0, low=0.0),), build=_perturbation("pag"), help="PAG"),
    Entry(
        "softpag",
        "perturbation",
        (Input("scale", float, 2.0, low=0.0),),
        build=_perturbation("softpag"),
        help=f"every head of PAG's layer at strength {SOFTPAG_STRENGTH:g}",
    ),
    Entry("tpg", "perturbation", (Input("scale", float, 2.0, low=0.0),), build=_perturbation("tpg"), help="TPG"),
    Entry(
        "slg",
        "perturbation",
        (Input("scale", float, 1.0, low=0.0),),
        build=_perturbation("slg"),
        help="skip-layer guidance: the middle transformer block left out of the weak branch",
    ),
    Entry("ddim", "scheduler", build=_scheduler("DDIMScheduler"), help="DDIM"),
    Entry("dpm++", "scheduler", build=_scheduler("DPMSolverMultistepScheduler"), help="DPM-Solver++"),
    Entry("euler", "scheduler", build=_scheduler("EulerDiscreteScheduler"), help="Euler (k-diffusion)"),
    Entry("unipc", "scheduler", build=_scheduler("UniPCMultistepScheduler"), help="UniPC"),
    Entry(
        "langevin",
        "score_sampler",
        (
            Input("steps_per_level", int, 4, low=1, high=100, help="Langevin steps per noise level"),
            Input("epsilon", float, None, low=0.0, positive=True, optional=True, help="step size (empty: sigma_min^2)"),
        ),
        build=_score_sampler("annealed_langevin"),
        help="annealed Langevin dynamics (Song & Ermon 2019); --steps noise levels",
    ),
    Entry(
        "pc",
        "score_sampler",
        (
            Input("corrector_steps", int, 1, low=0, high=10, help="Langevin corrector steps per level"),
            Input(
                "snr",
                float,
                0.16,
                low=0.0,
                high=1.0,
                step=0.01,
                positive=True,
                help="corrector signal-to-noise ratio r",
            ),
        ),
        build=_score_sampler("predictor_corrector"),
        help="predictor-corrector sampling (Song et al. 2021); --steps noise levels",
    ),
):
    register(_entry)
