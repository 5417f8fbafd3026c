"""Choosing layers of a denoiser by name, diffusers spelling or index.

A selector is one of:

* an ``int``: the i-th candidate (self-attention layer or transformer block), in
  module order; negative indices count from the end;
* an exact module name, e.g. ``"mid_block.attentions.0.transformer_blocks.0.attn1"``;
* a regular expression in diffusers' ``pag_applied_layers`` style, searched in
  module names: ``"mid"``, ``"down_blocks.2"``, ``"blocks.1"``; the older spelling
  ``"down.block_1"`` / ``"up.block_0.attentions_1"`` is accepted too. A trailing
  number means that number only: ``"blocks.1"`` is block 1, never block 10 (the
  diffusers PAG pipelines match both).

A selector that matches nothing is an error listing the valid names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

Selector = int | str


#: attention module names (their last part) that mark cross-attention in models whose attention modules do not
#: say so themselves (Kandinsky 5's ``cross_attention``, LTX's ``attn2``); modules that say so are taken at their
#: word (SD 3.5's ``attn2`` is a second self-attention)
CROSS_ATTENTION_NAMES = ("cross_attention", "cross_attn", "attn2")


#: models whose attention modules all call themselves cross-attention (each is built with a key dimension), with
#: the names of their self-attention modules: Kandinsky 3's UNet blocks open (down) or close (up) with one
#: self-attention block, ``attentions.0``; the others, and its time-condition pooling, attend to the text
SELF_ATTENTION_NAMES = {"Kandinsky3UNet": re.compile(r"(?:down|up)_blocks\.\d+\.attentions\.0\.attention")}


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    flag = getattr(module, "is_cross_attention", None)
    return bool(flag) if flag is not None else name.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES


def self_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules of ``model`` whose queries and keys come from the same tokens (incl. joint attention)."""
    named = SELF_ATTENTION_NAMES.get(type(model).__name__)
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "processor")
        and (named.fullmatch(name) is not None if named is not None else not _is_cross_attention(name, module))
    }


#: transformer blocks whose class names do not end with "TransformerBlock"
OTHER_BLOCKS = ("ErnieImageSharedAdaLNBlock", "PRXBlock", "Kandinsky5TransformerDecoderBlock", "CogVideoXBlock")


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Transformer blocks of ``model`` (BasicTransformerBlock, JointTransformerBlock, Flux blocks, ...,
    :data:`OTHER_BLOCKS`)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith("TransformerBlock") or type(module).__name__ in OTHER_BLOCKS
    }


def _pattern(selector: str) -> re.Pattern[str]:
    legacy = re.fullmatch(r"(down|up)\.block_(\d+)(?:\.attentions_(\d+))?", selector)
    if legacy:
        direction, block, attention = legacy.groups()
        selector = f"{direction}_blocks.{block}" + (f".attentions.{attention}" if attention else "")
    elif re.fullmatch(r"blocks?_(\d+)", selector):
        selector = "blocks." + selector.split("_")[1]
    if selector[-1].isdigit():
        selector += r"(?![0-9])"
    try:
        return re.compile(selector)
    except re.error as error:
        raise ValueError(f"invalid layer pattern {selector!r}: {error}") from None


def select(candidates: dict[str, nn.Module], selectors: Iterable[Selector], what: str) -> dict[str, nn.Module]:
    """The candidates chosen by ``selectors``, in module order; ``ValueError`` for a selector matching none."""
    names = list(candidates)
    chosen: set[str] = set()
    for selector in selectors:
        if isinstance(selector, bool) or not isinstance(selector, (int, str)) or selector == "":
            raise ValueError(f"a layer selector must be an int or a non-empty str, got {selector!r}")
        if isinstance(selector, int):
            if not -len(names) <= selector < len(names):
                raise ValueError(f"{what} index {selector} is out of range: the model has {len(names)} {what}s")
            matched = [names[selector]]
        elif selector in candidates:
            matched = [selector]
        else:
            pattern = _pattern(selector)
            matched = [name for name in names if pattern.search(name)]
        if not matched:
            raise ValueError(f"no {what} matches {selector!r}; valid names: {_summary(names)}")
        chosen.update(matched)
    return {name: candidates[name] for name in names if name in chosen}


def _summary(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


#: where a video UNet keeps its temporal layers: AnimateDiff's motion modules, Stable Video Diffusion's temporal
#: transformer blocks beside the spatial ``transformer_blocks``
TEMPORAL_LAYERS = (".motion_modules.", ".temporal_transformer_blocks.")


def has_motion_modules(candidates: dict[str, nn.Module]) -> bool:
    """Whether the candidates are a video UNet's: temporal layers (:data:`TEMPORAL_LAYERS`) beside the spatial
    ones."""
    return any(part in name for name in candidates for part in TEMPORAL_LAYERS)


def spatial(block: str) -> str:
    """The selector of a UNet block's spatial transformer blocks (not its temporal ones)."""
    return rf"^{block}\.attentions\.\d+\.(?:.*\.)?transformer_blocks\."


def default_layers(candidates: dict[str, nn.Module]) -> list[Selector]:
    """The default choice: the UNet's middle block (a video UNet's: its spatial layers, not its motion modules),
    the deepest down block and the first up block of a UNet without one (Kandinsky 3), else the middle transformer
    block of the main stack (``transformer_blocks``, else the first ``…blocks`` / ``…layers`` stack that is not a
    text stack ``text_…``: Z-Image's ``layers``, not its refiners; Kandinsky 5's ``visual_transformer_blocks``, not
    its text encoder's)."""
    if any(name.startswith("mid_block") for name in candidates):
        return [spatial("mid_block")] if has_motion_modules(candidates) else ["mid"]
    levels = {
        part: [int(m.group(1)) for n in candidates if (m := re.match(rf"{part}\.(\d+)\.", n))]
        for part in ("down_blocks", "up_blocks")
    }
    if levels["down_blocks"] and levels["up_blocks"]:  # a UNet without a middle block (Kandinsky 3): its bottleneck
        return [rf"^down_blocks\.{max(levels['down_blocks'])}\.", rf"^up_blocks\.{min(levels['up_blocks'])}\."]
    blocks: dict[str, list[int]] = {}
    for name in candidates:
        if (m := re.match(r"([a-z_]*(?:blocks|layers))\.(\d+)", name)) and not m.group(1).startswith("text_"):
            blocks.setdefault(m.group(1), []).append(int(m.group(2)))
    if not blocks:
        return [len(candidates) // 2]
    stack = "transformer_blocks" if "transformer_blocks" in blocks else next(iter(blocks))
    indices = sorted(set(blocks[stack]))
    return [f"^{stack}.{indices[len(indices) // 2]}"]
