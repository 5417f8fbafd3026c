"""guidance.method: the method objects are frozen, keyword-only, validated and serialisable."""

import dataclasses

import pytest

from guidance import APG, CFG, Guidance


def test_methods_are_frozen_keyword_validated_and_serialisable():
    apg = APG(7.5, eta=0.2, norm_threshold=10.0, momentum=-0.3, space="model")
    with pytest.raises(dataclasses.FrozenInstanceError):
        apg.scale = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        APG(7.5, 0.2)  # type: ignore[misc]  (options are keyword-only)
    assert Guidance.from_dict(apg.to_dict()) == apg
    assert Guidance.from_dict(CFG(3.0).to_dict()) == CFG(3.0)
    with pytest.raises(ValueError, match="unknown guidance method"):
        Guidance.from_dict({"method": "nope", "scale": 1.0})
    with pytest.raises(ValueError, match="scale"):
        CFG(float("inf"))


@pytest.mark.parametrize("cls", ["cfg", "apg", "pag", "softpag", "tpg"])
def test_negative_scales_are_refused_and_zero_is_allowed(cls):
    from guidance.method import REGISTRY

    extra = {"heads": ((0, 0),)} if cls == "softpag" else {}
    method = REGISTRY[cls]
    assert method(0.0, **extra).scale == 0.0  # 0: no update (CFG: the unconditional prediction)
    assert method(0.5, **extra).scale == 0.5
    with pytest.raises(ValueError, match=r"scale must be >= 0 .*got -3"):
        method(-3, **extra)
