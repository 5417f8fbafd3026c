"""protect.evaluate: the purifications it reports, SDEdit and LoRA mimicry, the evaluation rows on the demo models,
and the ``steerguard evaluate`` command (apps/evaluation.py)."""

from __future__ import annotations

import json

import pytest
import torch

from apps.demo import DEMO_DIR
from protect import AmortizedProtector, protect
from protect.evaluate import PURIFICATIONS, evaluate, lora_mimic, purify, sdedit

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
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0  # a second run never overwrites the first report
    first, second = json.loads(report.read_text()), json.loads((tmp_path / "eval-1.json").read_text())
    assert first["rows"] == second["rows"]  # seeded end to end
    rows = {(r["protection"], r["purification"]): r for r in first["rows"]}
    assert len(rows) == 3 * 5 and "lora_fd" in rows[("noise", "jpeg75")] and "lora_fd" not in rows[("noise", "blur1")]
    assert rows[("photoguard@1", "none")]["linf_255"] <= 8 + 1e-3
    assert "| photoguard@1 | none |" in capsys.readouterr().out
    assert cli_main(["evaluate", "--methods", "glaze"]) == 2
    assert cli_main(["evaluate", "--strengths", "1.5"]) == 2
