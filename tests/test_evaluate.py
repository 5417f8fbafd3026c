"""protect.evaluate: the purifications it reports, SDEdit and LoRA mimicry, the evaluation rows on the demo models,
and the ``steerguard evaluate`` command (apps/evaluation.py)."""

from __future__ import annotations

import json

import pytest
import torch

from apps.demo import DEMO_DIR
from protect import AmortizedProtector, protect
from protect.evaluate import PURIFICATIONS, evaluate, lora_mimic, purify, sdedit, worst_case

EPS = 8 / 255
HAS_DEMO = all((DEMO_DIR / name).is_dir() for name in ("vae", "dit", "classifier"))
demo_only = pytest.mark.skipif(not HAS_DEMO, reason="the demo models are not in demo_models/")


def test_purifications_keep_shape_and_range():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in PURIFICATIONS:
        y = purify(x, name)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(purify(x, "none"), x) and not torch.equal(purify(x, "jpeg75"), x)
    with pytest.raises(ValueError, match="unknown purification"):
        purify(x, "diffpure")


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@demo_only
def test_sdedit_and_lora_mimicry_run(demo):
    pipe, _, images, labels = demo
    edited = sdedit(pipe, images[:2], labels[:2], strength=0.3, steps=5, generator=_gens(2))
    again = sdedit(pipe, images[1:2], labels[1:2], strength=0.3, steps=5, generator=_gens(1, 1))
    assert edited.shape == (2, 3, 32, 32) and torch.allclose(edited[1:], again, atol=1e-5)  # per-image seeds
    with pytest.raises(ValueError, match="strength"):
        sdedit(pipe, images, labels, strength=0)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    samples = lora_mimic(pipe, images[:4], labels[:4], steps=2, batch_size=2, samples=3, sampling_steps=3)
    assert samples.shape == (3, 3, 32, 32)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())  # the pipe is untouched


@demo_only
def test_protections_degrade_img2img_by_a_clear_margin(demo):
    """PhotoGuard PGD and the committed amortized protector change the SDEdit result of the demo DiT far more than
    random noise of the same budget does, before and after JPEG q75."""
    pipe, classifier, images, labels = demo
    protected = {"pgd": protect(images, "photoguard", vae=pipe.vae, steps=20, generator=_gens(8))[0]}
    if (DEMO_DIR / "protector").is_dir():
        model = AmortizedProtector.from_pretrained(str(DEMO_DIR / "protector"))
        protected["amortized"] = protect(images, "amortized", vae=pipe.vae, protector=model)[0]
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    protected["noise"] = (images + EPS * signs).clamp(0, 1)

    def mimic(x):
        return sdedit(pipe, x, labels, strength=0.2, steps=10, generator=_gens(8, 100))

    rows = evaluate(
        images,
        protected,
        labels,
        mimics={"sdedit": mimic},
        classifier=classifier,
        vaes={"A": pipe.vae},
        purifications=("none", "jpeg75"),
    )
    by = {(r["protection"], r["purification"]): r for r in rows}
    assert by[("clean", "none")]["sdedit_psnr_to_clean"] > 100  # the reference against itself
    for name in set(protected) - {"noise"}:
        row, noise = by[(name, "none")], by[("noise", "none")]  # about 10.5 dB and 1.6x here
        assert row["sdedit_psnr_to_clean"] < noise["sdedit_psnr_to_clean"] - 6, rows
        assert row["latent_distortion_A"] > 1.4 * noise["latent_distortion_A"], rows
        row, noise = by[(name, "jpeg75")], by[("noise", "jpeg75")]  # JPEG q75 keeps about 6.7 dB of it
        assert row["sdedit_psnr_to_clean"] < noise["sdedit_psnr_to_clean"] - 4, rows
        assert by[(name, "none")]["linf_255"] <= 8 + 1e-3 and by[(name, "none")]["psnr"] > 28


@demo_only
def test_evaluate_command_writes_a_new_report(tmp_path, capsys):
    from apps.cli import main as cli_main

    report = tmp_path / "eval.json"
    argv = ["evaluate", "--methods", "photoguard@1", "noise", "-n", "4", "--strengths", "0.3"]
    argv += ["--lora-steps", "2", "--json", str(report), "--device", "cpu"]
    argv += ["--purifications", "none", "jpeg75", "diffpure", "impress"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0  # a second run never overwrites the first report
    first, second = json.loads(report.read_text()), json.loads((tmp_path / "eval-1.json").read_text())
    assert first["rows"] == second["rows"]  # seeded end to end
    rows = {(r["protection"], r["purification"]): r for r in first["rows"]}
    protections = ("clean", "photoguard@1", "noise", "random_noise")  # random noise of the budget: always a row
    assert set(rows) == {(p, q) for p in protections for q in ("none", "jpeg75", "diffpure", "impress")}
    assert "lora_fd" in rows[("noise", "jpeg75")] and "lora_fd" not in rows[("noise", "diffpure")]
    assert rows[("photoguard@1", "none")]["linf_255"] <= 8 + 1e-3
    assert rows[("random_noise", "none")]["linf_255"] == pytest.approx(8, abs=1e-3)
    assert (
        first["settings"]["pixel_model"] == "demo/unet" and "DiffPure" in first["settings"]["purifications"]["diffpure"]
    )
    worst = {e["protection"]: e for e in first["worst_case"]["latent_distortion_A"]}
    assert set(worst) == set(protections[1:])
    for name, entry in worst.items():  # the least latent distortion over the purifications
        assert entry["value"] == min(
            rows[(name, q)]["latent_distortion_A"] for q in ("none", "jpeg75", "diffpure", "impress")
        )
    out = capsys.readouterr().out
    assert "| photoguard@1 | none |" in out and "worst case over purifications" in out
    assert f"| photoguard@1 | {worst['photoguard@1']['value']:.3g} ({worst['photoguard@1']['purification']})" in out
    assert cli_main(["evaluate", "--methods", "glaze"]) == 2
    assert cli_main(["evaluate", "--strengths", "1.5"]) == 2
    assert cli_main(["evaluate", "--purifications", "jpeg", "-n", "2"]) == 2  # random EOT entries: not evaluated
    assert "unknown purifications ['jpeg']" in capsys.readouterr().err


def test_worst_case_is_the_purification_with_the_least_damage():
    def row(protection, purification, distortion, psnr):
        return {
            "protection": protection,
            "purification": purification,
            "latent_distortion_A": distortion,
            "sdedit_psnr_to_clean": psnr,
        }

    rows = [row("clean", "none", 0.0, 120.0), row("clean", "jpeg75", 0.0, 120.0)]
    rows += [row("pgd", "none", 0.6, 20.0), row("pgd", "jpeg75", 0.2, 30.0), row("pgd", "diffpure", 0.3, 35.0)]
    rows += [row("random_noise", "none", 0.2, 40.0), row("random_noise", "jpeg75", 0.1, 41.0)]
    rows += [row("random_noise", "diffpure", 0.15, 42.0)]
    (pgd, noise) = worst_case(rows, "latent_distortion_A")  # higher distortion = more damage: the minimum
    assert pgd == {
        "protection": "pgd",
        "metric": "latent_distortion_A",
        "purification": "jpeg75",
        "value": 0.2,
        "unpurified": 0.6,
        "random_noise": 0.1,
    }
    assert noise["purification"] == "jpeg75" and noise["value"] == 0.1
    pgd, _ = worst_case(rows, "sdedit_psnr_to_clean")  # a higher PSNR to the clean mimicry = less damage
    assert pgd["purification"] == "diffpure" and pgd["value"] == 35.0 and pgd["random_noise"] == 42.0
    assert worst_case(rows, "sdedit_psnr_to_clean", damage="higher")[0]["purification"] == "none"
    with pytest.raises(ValueError, match="no damage direction"):
        worst_case(rows, "psnr")
    with pytest.raises(ValueError, match="no row has"):
        worst_case(rows, "lora_fd")


@demo_only
def test_evaluate_takes_model_purifications_and_adds_random_noise(demo):
    from diffusers import DDPMScheduler, UNet2DModel

    from protect.purifiers import model_purifications

    pipe, classifier, images, labels = demo
    unet = UNet2DModel.from_pretrained(DEMO_DIR / "unet", subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(DEMO_DIR / "unet", subfolder="scheduler")
    table = model_purifications(vae=pipe.vae, pixel_model=(unet, scheduler), diffpure_steps=3, impress_steps=3)
    shifted = (images[:4] + 2 / 255).clamp(0, 1)
    rows = evaluate(
        images[:4],
        {"shift": shifted},
        labels[:4],
        mimics={"same": lambda x: x},
        classifier=classifier,
        vaes={"A": pipe.vae},
        purifications={"none": PURIFICATIONS["none"], **table},
        seed=1,
    )
    by = {(r["protection"], r["purification"]): r for r in rows}
    assert set(by) == {(p, q) for p in ("clean", "shift", "random_noise") for q in ("none", *table)}
    assert by[("random_noise", "none")]["linf_255"] == pytest.approx(2, abs=1e-3)  # the protections' budget
    purified = table["diffpure"](images[:4])
    assert by[("clean", "diffpure")]["same_psnr_to_clean"] > 100  # the purified clean mimicry is the reference
    assert by[("clean", "diffpure")]["latent_distortion_A"] == 0
    assert not torch.equal(purified, images[:4])
    with pytest.raises(ValueError, match="unknown purifications"):
        evaluate(images[:4], {}, labels[:4], mimics={}, classifier=classifier, purifications=("diffpure",))
    with pytest.raises(ValueError, match="rows evaluate adds"):
        evaluate(images[:4], {"random_noise": shifted}, labels[:4], mimics={}, classifier=classifier)


def test_aspl_fine_tunes_the_demo_dit_on_the_images_classes(demo):
    """``steerguard evaluate --methods aspl@N``: ASPL fine-tunes the demo DiT conditioned on the images' classes (a
    DreamBooth attacker's conditioning), within the budget; the classes matter, the pipeline's DiT is untouched."""
    from apps.evaluation import DiTDenoiser, protect_all

    pipe, _, images, labels = demo
    images, labels = images[:2], labels[:2]
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with_classes, _ = protect_all(images, ["aspl@2"], pipe=pipe, eps=8 / 255, seed=1, labels=labels)
    unconditional, _ = protect_all(images, ["aspl@2"], pipe=pipe, eps=8 / 255, seed=1)
    out = with_classes["aspl@2"]
    assert out.shape == images.shape and (out - images).abs().max() <= 8 / 255 + 1e-6
    assert not torch.equal(out, unconditional["aspl@2"])
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # a latent smaller than the DiT's
    assert DiTDenoiser(pipe.transformer, labels)(z, torch.tensor([10, 500])).shape == z.shape
