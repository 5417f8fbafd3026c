"""steerguard.guidance: guidance methods for unchanged diffusers pipelines.

>>> from guidance import APG, guide
>>> with guide(pipe, APG(7.5)):
...     image = pipe("a lighthouse at dusk").images[0]
"""

from .apg import APG
from .cfg import CFG
from .corrector import LangevinCorrector
from .method import REGISTRY, Guidance
from .pag import PAG, SoftPAG
from .pipeline import FAMILIES, guide
from .slg import SLG
from .tpg import TPG

__all__ = [
    "APG",
    "CFG",
    "FAMILIES",
    "PAG",
    "REGISTRY",
    "SLG",
    "TPG",
    "Guidance",
    "LangevinCorrector",
    "SoftPAG",
    "guide",
]
