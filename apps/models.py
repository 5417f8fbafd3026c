"""Naming models by hub id or local path, the same way for the embedded demo models and hub models.

``models.txt`` (repository root) lists every model the suite loads by id, one per
line: ``<id or path>  <role>``; the embedded demo models come first and are
addressed as ``demo/<name>`` (resolved to the repository's ``demo_models/``).
Weights are read from safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

from pathlib import Path

MODELS_TXT = Path(__file__).resolve().parents[1] / "models.txt"
DEFAULT_MODEL = "demo/dit"


def listed_models(path: Path = MODELS_TXT) -> list[tuple[str, str]]:
    """``(id, role)`` pairs from ``models.txt`` (comments and blank lines skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, role = line.partition(" ")
            rows.append((name, role.strip()))
    return rows


def resolve(name: str) -> str:
    """A ``demo/<name>`` alias becomes the local folder; anything else is a hub id or a path, as given."""
    if name.startswith("demo/"):
        from .demo import model_path

        return str(model_path(name.removeprefix("demo/")))
    return name
