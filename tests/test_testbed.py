"""The adversarial-detection testbed: victim, attacks, benign changes, baselines, metrics, the demo detector."""

import math

import pytest
import torch

from apps import demo
from apps.demo import DEMO_DIR, generate
from protect import metrics
from protect import testbed as tb
from protect.purify import sign_noise

DETECTOR_DIR = DEMO_DIR / "eps_detector"


@pytest.fixture(scope="module")
def victim():
    try:
        return demo.load_victim()
    except FileNotFoundError as error:
        pytest.skip(f"demo classifier missing: {error}")


@pytest.fixture(scope="module")
def data():
    images, labels = generate(24, torch.Generator().manual_seed(4_000_003), size=16)
    return tb.to_unit(images), labels


def test_victim_takes_unit_images_at_16px(victim, data):
    images, labels = data
    logits = victim(images)
    assert logits.shape == (len(images), 10)
    assert (logits.argmax(1) == labels).double().mean() > 0.8


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_l2", "bim", "mim", "cw"])
def test_attacks_keep_budget_and_fool_the_victim(victim, data, name):
    images, labels = data
    eps = 8 / 255
    adversarial = tb.attack(name, victim, images, labels, eps, cw_steps=30)
    assert adversarial.shape == images.shape and adversarial.min() >= 0 and adversarial.max() <= 1
    norm, radius = tb.budget_of(name, eps, tuple(images.shape[1:]))
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= radius * (1 + 1e-5) + 1e-6).all()
    assert tb.success_rate(victim, images, adversarial, labels) > 0  # at least one prediction flipped


def test_attack_is_seeded_and_leaves_global_rng_alone(victim, data):
    images, labels = data[0][:4], data[1][:4]
    state = torch.random.get_rng_state()
    first = tb.attack("pgd", victim, images, labels, 4 / 255, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(tb.attack("pgd", victim, images, labels, 4 / 255, seed=3), first)
    assert not torch.equal(tb.attack("pgd", victim, images, labels, 4 / 255, seed=4), first)


def test_l2_budget_matches_cifar_convention():
    assert math.isclose(tb.l2_budget(8 / 255, (3, 32, 32)), 0.5)
    assert math.isclose(tb.l2_budget(4 / 255, (3, 16, 16)), 0.125)


def test_attack_rejects_bad_inputs(victim, data):
    with pytest.raises(ValueError, match="unknown attack"):
        tb.attack("deepfool", victim, *data)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tb.attack("fgsm", victim, data[0] * 2 - 1, data[1])


@pytest.mark.parametrize("name", list(tb.BENIGN))
def test_benign_changes_keep_shape_and_range(data, name):
    images = data[0]
    changed = tb.BENIGN[name](images)
    assert changed.shape == images.shape and changed.dtype == images.dtype
    assert changed.min() >= 0 and changed.max() <= 1
    assert not torch.equal(changed, images)


def test_sign_noise_has_the_attack_budget(data):
    delta = sign_noise(data[0], eps=4 / 255) - data[0]
    assert delta.abs().max() <= 4 / 255 + 1e-6
    assert (delta.abs() > 3.9 / 255).double().mean() > 0.9  # only pixels clipped at 0 / 1 lose budget


def test_baselines():
    images = torch.full((4, 3, 16, 16), 0.5)
    assert torch.equal(tb.high_frequency_energy(images), torch.zeros(4))
    assert (tb.high_frequency_energy(sign_noise(images)) > 0).all()
    eps = torch.zeros(2, 3, 4, 4)
    eps[1] = 1.0
    torch.testing.assert_close(tb.eps_norm(eps), torch.tensor([0.0, math.sqrt(48)]))


@pytest.mark.skipif(not (DETECTOR_DIR / "config.json").is_file(), reason="demo eps_detector not saved")
def test_demo_detector_separates_pgd_from_clean(victim):
    import json

    from apps.models import load_score_model
    from protect.detector import EPSDetector

    name = json.loads((DETECTOR_DIR / "config.json").read_text()).get("diffusion_model", "demo/unet")
    unet, scheduler = load_score_model(name)
    detector = EPSDetector.from_pretrained(DETECTOR_DIR, unet, scheduler)
    images, labels = generate(32, torch.Generator().manual_seed(5_000_003), size=16)
    clean, attacked = tb.to_unit(images[:16]), tb.attack("pgd", victim, tb.to_unit(images[16:]), labels[16:], 8 / 255)
    clean_scores = detector.score(tb.to_signed(clean))
    adversarial_scores = detector.score(tb.to_signed(attacked))
    assert clean_scores.mean() < adversarial_scores.mean()
    assert metrics.auroc(clean_scores, adversarial_scores) > 0.8  # 0.98 on 200 + 200 images in bench_detection
