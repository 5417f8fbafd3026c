"""Installing weak-model perturbations (PAG, SoftPAG, TPG) as scoped hooks on a denoiser.

Each perturbation acts only on the batch rows that the guide controller assigns
to it for the current denoiser call (``run.rows[i]``), so the perturbed branches
can be batched with the conditional and unconditional ones.

Attention perturbations intercept ``torch.nn.functional.scaled_dot_product_attention``
inside the chosen attention modules (as diffusers' guiders do), so they work
whatever SDPA-based processor is set and keep QK-norm and joint attention intact.
Self-attention processors that never call SDPA but compute ``to_out(attention(to_v(x)))``
(:data:`VALUE_PATH_PROCESSORS`: Sana's linear attention, sliced attention, the classic
``AttnProcessor``) are perturbed on the value path instead: the input of ``to_out[0]``
becomes ``(1 - u) out + u to_v(x)`` on the chosen rows and heads, which is the same
identity (diffusers' Sana PAG processor computes it so). Any other processor (xformers,
a non-native attention backend) is refused when ``guide()`` is entered; one that still
never reaches SDPA or the value path at run time raises an error instead of being
silently skipped.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .engine import module_rows
from .hooks import ACTIVE_RUN, attach
from .method import AttentionEdit, BlockSkip, Perturbation, TokenShuffle
from .pag import heads_by_layer, soft_identity
from .tpg import shuffle_tokens

__all__ = ["VALUE_PATH_PROCESSORS", "active_run", "check_sdpa_processor", "heads_by_layer", "install"]

SDPA = torch.nn.functional.scaled_dot_product_attention
#: diffusers attention backends that call torch's SDPA on the (batch, heads, tokens, dim) layout
SDPA_BACKENDS = ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn")
#: self-attention processors without SDPA whose output is ``to_out(attention(q, k, to_v(x)))`` with the heads laid
#: out head-major in the channels (perturbed on that value path)
VALUE_PATH_PROCESSORS = ("SanaLinearAttnProcessor2_0", "AttnProcessor", "SlicedAttnProcessor")


Rule = tuple[slice, "list[int] | None", float, "tuple[int, int] | None"]  # rows, heads, strength, image block


class _AttentionMode(torch.overrides.TorchFunctionMode):
    """On the given rows and heads, SDPA's output becomes ``(1 - u) out + u v`` (or image-only identity).

    ``image_queries``: the queries may be the last of the keys (PRX: image queries over ``[text, image]`` keys);
    each query's own value is then the one at its place among those last keys. The rows are those of the
    denoiser call's ``batch`` (:func:`guidance.engine.module_rows`)."""

    def __init__(self, rules: list[Rule], batch: int, name: str, image_queries: bool = False) -> None:
        super().__init__()
        self.rules, self.batch, self.name = rules, batch, name
        self.image_queries = image_queries
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is SDPA:
            names = ("query", "key", "value")
            query, key, value = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(names))
            queries, keys = query.shape[-2], value.shape[-2]
            if queries == keys or (self.image_queries and keys > queries):  # self / joint attention only
                self.calls += 1
                offset = keys - queries  # where the queries sit among the keys
                for given, heads, strength, image in self.rules:
                    rows = module_rows(given, out.shape[0], self.batch, self.name)
                    if image is None:
                        out[rows] = soft_identity(out[rows], value[rows][..., offset:, :], strength, heads)
                    else:
                        mask = _image_identity_mask(queries, keys, image, query)
                        mask, extra = _with_call_mask(mask, rows, query, args, kwargs)
                        out[rows] = func(query[rows], key[rows], value[rows], attn_mask=mask, **extra)
        return out


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _with_call_mask(
    mask: torch.Tensor, rows: slice, query: torch.Tensor, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, dict]:
    """The identity ``mask`` combined with the SDPA call's own mask (a padding mask, a causal flag) for the
    perturbed ``rows``, and the call's other arguments (scale, dropout, GQA) for the recomputation."""
    given = dict(zip(SDPA_ARGS, args)) | kwargs
    own = given.get("attn_mask")
    if own is not None:
        if own.dtype == torch.bool:  # True: may attend
            own = torch.zeros(own.shape, device=mask.device, dtype=mask.dtype).masked_fill(~own, float("-inf"))
        if own.ndim == 4 and own.shape[0] == query.shape[0] and own.shape[0] > 1:
            own = own[rows]
        mask = mask + own.to(mask.dtype)
    if given.get("is_causal"):
        length = query.shape[-2]
        mask = mask + torch.full((length, length), float("-inf"), device=mask.device, dtype=mask.dtype).triu(1)
    extra = {k: given[k] for k in ("dropout_p", "scale", "enable_gqa") if given.get(k) is not None}
    return mask, extra


def _image_identity_mask(queries: int, keys: int, image: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """Additive ``(queries, keys)`` mask: image tokens see only themselves among image tokens (and all text
    tokens). ``image`` is (start, count) among the keys; the queries are the last ``queries`` keys."""
    start, count = image
    first = start - (keys - queries)  # the image's first query
    mask = torch.zeros(queries, keys, device=like.device, dtype=like.dtype)
    block = torch.full((count, count), float("-inf"), device=like.device, dtype=like.dtype)
    mask[first : first + count, start : start + count] = block.fill_diagonal_(0)
    return mask


class _ValuePath:
    """While entered: on the given rows and heads, the input of ``module.to_out[0]`` becomes ``(1 - u) out + u v``,
    ``v`` being ``module.to_v``'s output of the same call (the value path of :data:`VALUE_PATH_PROCESSORS`); the
    rows are those of the denoiser call's ``batch``."""

    def __init__(self, module: nn.Module, rules: list[Rule], batch: int, name: str) -> None:
        self.module, self.rules, self.batch, self.name = module, rules, batch, name
        self.value: torch.Tensor | None = None
        self.calls = 0

    def __enter__(self) -> _ValuePath:
        self.handles = [
            self.module.to_v.register_forward_hook(self._keep_value),
            self.module.to_out[0].register_forward_pre_hook(self._mix),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.value = None

    def _keep_value(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = output

    def _mix(self, module: nn.Module, args: tuple) -> tuple:
        out, value = args[0], self.value
        if value is None or value.shape != out.shape or out.ndim != 3:
            shape = None if value is None else tuple(value.shape)
            raise RuntimeError(
                f"{self.name}: the attention output {tuple(out.shape)} does not match its value projection {shape}; "
                "cannot apply the identity on the value path"
            )
        self.calls += 1
        self.value = None
        heads = self.module.heads
        as_heads = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, H * D) -> (B, H, N, D)
        mixed = out.clone()
        for given, chosen, strength, _ in self.rules:
            rows = module_rows(given, out.shape[0], self.batch, self.name)
            done = soft_identity(as_heads(out[rows]), as_heads(value[rows]).to(out.dtype), strength, chosen)
            mixed[rows] = done.transpose(1, 2).flatten(-2)
        return (mixed, *args[1:])


def active_run(controller: Any) -> Any:
    """The run of ``controller``'s pipeline call in progress in this thread, or ``None``."""
    run = ACTIVE_RUN.get()
    return run if run is not None and run.controller is controller else None


class _AttentionHook(ModelHook):
    def __init__(self, controller: Any, name: str, rules: list[tuple[int, list[int] | None, float, bool]]) -> None:
        super().__init__()
        self.controller, self.name, self.rules = controller, name, rules

    @torch.compiler.disable
    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = active_run(self.controller)
        rules = [
            (run.rows[i], heads, u, image_only)
            for i, heads, u, image_only in self.rules
            if run is not None and run.rows[i] is not None
        ]
        if not rules:
            return self.fn_ref.original_forward(*args, **kwargs)
        # where the image tokens sit is read (binding the call's arguments) only when a joint="image" rule acts
        image = self._image_block(module, args, kwargs, run) if any(rule[3] for rule in rules) else None
        active = [(rows, heads, u, image if image_only else None) for rows, heads, u, image_only in rules]
        processor = type(getattr(module, "processor", None)).__name__
        if processor in VALUE_PATH_PROCESSORS:
            if any(rule[3] is not None for rule in active):
                raise RuntimeError(
                    f"{self.name}: the image-only identity (joint='image') needs the attention scores; {processor} "
                    "is perturbed on the value path"
                )
            with _ValuePath(module, active, run.batch, self.name) as path:
                output = self.fn_ref.original_forward(*args, **kwargs)
            if path.calls != 1:
                raise RuntimeError(f"{self.name}: {processor} did not run its value projection and output once")
            return output
        with _AttentionMode(active, run.batch, self.name, self.controller.family.image_queries) as mode:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if mode.calls == 0:
            raise RuntimeError(
                f"{self.name}: attention ran without torch's scaled_dot_product_attention (processor {processor}); "
                "attention perturbations need an SDPA processor and the 'native' attention backend, or one of "
                f"{', '.join(VALUE_PATH_PROCESSORS)}"
            )
        return output

    def _image_block(self, module: nn.Module, args: tuple, kwargs: dict, run: Any) -> tuple[int, int] | None:
        """Where the image tokens sit in a joint attention's sequence, (start, count) (``None``: not joint).

        A joint block passes the text as ``encoder_hidden_states`` (HiDream: ``norm_encoder_hidden_states``);
        single-stream blocks join text and image themselves and call attention on one sequence, ``[text, image]``
        (FLUX, AuraFlow) or ``[image, text]`` (HiDream): a sequence as long as the denoiser call's text and image
        tokens together (:attr:`guidance.engine.Run.tokens`) is read as that."""
        hidden, context = _attention_inputs(module, args, kwargs)
        text_first = self.controller.family.text_first
        if context is not None:
            return (context.shape[1] if text_first else 0), hidden.shape[1]
        tokens = run.tokens if run is not None else None
        if tokens is not None and hidden is not None and hidden.shape[1] == sum(tokens):
            return tokens if text_first else (0, tokens[1])
        return None


def _attention_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """An attention module call's hidden states and text states (None: self-attention), bound by name (diffusers'
    ``hidden_states`` / ``encoder_hidden_states``, HiDream's ``norm_`` spellings), else by position."""
    try:
        bound = dict(_signature(type(module)).bind_partial(module, *args, **kwargs).arguments)
    except TypeError:  # a call its signature does not take: by position, as diffusers' attention modules
        bound = dict(zip(("hidden_states", "encoder_hidden_states"), args))
    bound.update(kwargs)  # those a ``**kwargs`` parameter collected
    pick = lambda names: next((bound[n] for n in names if bound.get(n) is not None), None)
    hidden = pick(("hidden_states", "norm_hidden_states"))
    if hidden is None:  # another name: the first argument
        hidden = args[0] if args else None
    return hidden, pick(("encoder_hidden_states", "norm_encoder_hidden_states"))


class _ShuffleHook(ModelHook):
    def __init__(self, controller: Any, methods: list[int]) -> None:
        super().__init__()
        self.controller, self.methods = controller, methods

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        run = active_run(self.controller)
        rows = [(run.rows[i], run.states[i]) for i in self.methods] if run is not None else []
        rows = [(r, generator) for r, generator in rows if r is not None]
        if not rows:
            return args, kwargs
        bound = _signature(type(module)).bind_partial(module, *args, **kwargs)
        name = _hidden_name(module, bound.arguments)
        sequence_first = self.controller.family.sequence_first  # ERNIE-Image's blocks: (tokens, batch, channels)
        given = bound.arguments[name]
        hidden = (given.transpose(0, 1) if sequence_first else given).clone()
        valid = _padding_mask(bound.arguments, hidden)
        for given_rows, generator in rows:
            r = module_rows(given_rows, hidden.shape[0], run.batch, type(module).__name__)
            hidden[r] = shuffle_tokens(hidden[r], generator, None if valid is None else valid[r])
        bound.arguments[name] = hidden.transpose(0, 1).contiguous() if sequence_first else hidden
        return bound.args[1:], bound.kwargs  # without the module itself


def _hidden_name(module: nn.Module, arguments: dict[str, Any]) -> str:
    """The name under which a block call's bound ``arguments`` hold its hidden states: ``hidden_states``, else the
    first parameter after ``self`` (Z-Image's and ERNIE-Image's blocks call them ``x``)."""
    return "hidden_states" if "hidden_states" in arguments else list(_signature(type(module)).parameters)[1]


#: a block's argument that may hold a padding mask of its token sequence
PADDING_MASKS = ("attn_mask", "attention_mask")
#: a block's argument that may hold a padding mask as 1 / 0 weights (HiDream's non-square images, padded)
WEIGHT_MASKS = ("hidden_states_masks",)


def _padding_mask(arguments: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor | None:
    """The padding mask of ``hidden``'s tokens (batch-first) among a block call's bound ``arguments``, ``(B, L)``
    bool (True: a real token), if it has one: ``(B, L)`` (Z-Image, Lumina 2), a key-padding mask ``(B, 1, 1, L)``
    (Krea 2, ERNIE-Image) or 1 / 0 weights ``(B, L)`` (HiDream)."""
    for name in PADDING_MASKS:
        mask = arguments.get(name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            continue
        if mask.ndim == 4 and mask.shape[1:3] == (1, 1):
            mask = mask[:, 0, 0]
        if mask.shape == hidden.shape[:2]:
            return mask
    for name in WEIGHT_MASKS:
        mask = arguments.get(name)
        if isinstance(mask, torch.Tensor) and mask.shape == hidden.shape[:2]:
            return mask != 0
    return None


class _SkipHook(ModelHook):
    """On the rows of the methods that skip this block, its outputs are its inputs (the block left out)."""

    def __init__(self, controller: Any, name: str, methods: list[int]) -> None:
        super().__init__()
        self.controller, self.name, self.methods = controller, name, methods

    @torch.compiler.disable
    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = active_run(self.controller)
        rows = [run.rows[i] for i in self.methods if run.rows[i] is not None] if run is not None else []
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not rows:
            return output
        bound = _signature(type(module)).bind_partial(module, *args, **kwargs).arguments
        hidden, context = bound.get(_hidden_name(module, bound)), bound.get("encoder_hidden_states")
        if isinstance(hidden, torch.Tensor):  # the rows of the block's batch (AnimateDiff: the frames folded in)
            size = hidden.shape[1 if self.controller.family.sequence_first else 0]
            rows = [module_rows(r, size, run.batch, self.name) for r in rows]
        if isinstance(output, torch.Tensor) and self.controller.family.sequence_first:  # (tokens, batch, channels)
            return _passed_through(output.transpose(0, 1), hidden.transpose(0, 1), rows, self.name).transpose(0, 1)
        if isinstance(output, torch.Tensor):  # a basic / single-stream block: the hidden states
            return _passed_through(output, hidden, rows, self.name)
        if isinstance(output, tuple) and len(output) == 2:  # a joint block: the text and image streams
            first, second = output
            if _hidden_first(module, output, hidden):  # CogView4: (hidden_states, encoder_hidden_states)
                return _passed_through(first, hidden, rows, self.name), _skipped_text(second, context, rows, self.name)
            return _skipped_text(first, context, rows, self.name), _passed_through(second, hidden, rows, self.name)
        raise RuntimeError(f"{self.name}: cannot skip a block that returns {type(output).__name__}")


#: joint blocks that return ``(hidden_states, encoder_hidden_states)``; the others (FLUX, SD3, Qwen-Image) return
#: ``(encoder_hidden_states, hidden_states)``
HIDDEN_FIRST_BLOCKS = (
    "CogVideoXBlock",
    "CogView3PlusTransformerBlock",
    "CogView4TransformerBlock",
    "HiDreamImageTransformerBlock",
    "HunyuanVideoTransformerBlock",
    "HunyuanVideoSingleTransformerBlock",
)


def _hidden_first(module: nn.Module, output: tuple, hidden: Any) -> bool:
    """Whether a joint block's output pair starts with the image stream: read from the shapes when only one
    element has the image stream's shape, else from the block's class (:data:`HIDDEN_FIRST_BLOCKS`)."""
    shape = getattr(hidden, "shape", None)
    matches = [isinstance(o, torch.Tensor) and o.shape == shape for o in output]
    if matches.count(True) == 1:
        return matches[0]
    return type(module).__name__ in HIDDEN_FIRST_BLOCKS


def _skipped_text(output: torch.Tensor | None, given: Any, rows: list[slice], name: str) -> torch.Tensor | None:
    return output if output is None else _passed_through(output, given, rows, name)


@functools.cache
def _signature(block_class: type) -> inspect.Signature:
    """The signature of a block class's ``forward`` (bound with the module as ``self``)."""
    return inspect.signature(block_class.forward)


def _passed_through(output: torch.Tensor, given: Any, rows: list[slice], name: str) -> torch.Tensor:
    """``output`` with ``rows`` replaced by the block's input ``given`` on them."""
    if not isinstance(given, torch.Tensor) or given.shape != output.shape:
        shape = getattr(given, "shape", None)
        raise RuntimeError(f"{name}: the block's output {tuple(output.shape)} is not its input {shape}; cannot skip it")
    output = output.clone()
    for r in rows:
        output[r] = given[r]
    return output


def install(controller: Any, denoiser: nn.Module) -> Callable[[], None]:
    """Hook the edits of every perturbation method of ``controller`` into ``denoiser``; returns the remover.

    Edits are validated (layer selectors, attention processors) before any hook is attached; the hooks of one
    ``guide()`` are named after it, so pipelines sharing the denoiser can each have theirs. A ``torch.compile``d
    denoiser gets the hooks on the module it wraps.
    """
    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    attention_rules: dict[str, list[tuple[int, list[int] | None, float, bool]]] = {}
    shuffles: dict[str, list[int]] = {}
    skips: dict[str, list[int]] = {}
    for i, method in enumerate(controller.methods):
        if not isinstance(method, Perturbation):
            continue
        for name, edit in method.edits(denoiser).items():
            if isinstance(edit, AttentionEdit):
                if edit.image_only and controller.family.single_sequence:
                    raise ValueError(
                        f"{type(method).__name__}(joint='image') is not available on {controller.family.name}: its "
                        "attention runs on one sequence of image and caption tokens, padded per batch; use "
                        "joint='full'"
                    )
                heads = list(edit.heads) if edit.heads is not None else None
                attention_rules.setdefault(name, []).append((i, heads, edit.strength, edit.image_only))
            elif isinstance(edit, TokenShuffle):
                shuffles.setdefault(name, []).append(i)
            elif isinstance(edit, BlockSkip):
                skips.setdefault(name, []).append(i)
            else:
                raise TypeError(f"{type(method).__name__}.edits() returned an unknown edit {edit!r}")
    modules = dict(denoiser.named_modules())
    for name in attention_rules:
        check_sdpa_processor(name, modules[name])
    hook_name = f"steerguard.perturb.{id(controller):x}"  # one per guide(): pipelines may share the denoiser
    detachers: list[Callable[[], None]] = []

    def remove() -> None:
        while detachers:
            detachers.pop()()

    try:
        for name, rules in attention_rules.items():
            detachers.append(attach(modules[name], _AttentionHook(controller, name, rules), hook_name))
        for name, idx in shuffles.items():  # a block may be shuffled by one method and skipped by another
            detachers.append(attach(modules[name], _ShuffleHook(controller, idx), f"{hook_name}.shuffle"))
        for name, idx in skips.items():
            detachers.append(attach(modules[name], _SkipHook(controller, name, idx), f"{hook_name}.skip"))
    except BaseException:
        remove()
        raise
    return remove


@functools.cache
def _calls_sdpa(processor_class: type) -> bool | None:
    """Whether the processor's ``__call__`` calls SDPA, directly or through diffusers' dispatcher (None: unknown)."""
    try:
        source = inspect.getsource(processor_class.__call__)
    except (OSError, TypeError):
        return None
    return "scaled_dot_product_attention" in source or "dispatch_attention_fn" in source


def check_sdpa_processor(name: str, module: nn.Module) -> None:
    """``ValueError`` unless the attention ``module`` runs torch's SDPA, which the attention perturbations act on,
    or is one of :data:`VALUE_PATH_PROCESSORS`."""
    processor = getattr(module, "processor", None)
    if type(processor).__name__ in VALUE_PATH_PROCESSORS:
        return
    backend = getattr(processor, "_attention_backend", None)
    native = backend is None or str(getattr(backend, "value", backend)) in SDPA_BACKENDS
    if processor is not None and (_calls_sdpa(type(processor)) is False or not native):
        what = type(processor).__name__ + ("" if native else f" with attention backend {backend}")
        raise ValueError(
            f"{name}: attention perturbations act on torch's scaled_dot_product_attention, but this layer's "
            f"processor is {what} (xformers and other attention backends set such processors); use an SDPA "
            "processor: set_attn_processor(AttnProcessor2_0()) on the denoiser, or reset_attention_backend()"
        )
