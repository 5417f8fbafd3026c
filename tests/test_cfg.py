"""guidance.cfg: the CFG update is the pipelines' formula."""

import torch

from guidance.cfg import cfg_update
from tests.factories import guidance_pair as _pair


def test_cfg_update_is_the_pipeline_formula():
    c, u = _pair(3)
    torch.testing.assert_close(c + cfg_update(c, u, 7.5), u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)
