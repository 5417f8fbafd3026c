"""guidance.registry: entries describe their inputs; the CLI's generate options and the app's Generate tab are
built from them; the score samplers run from the CLI on the demo pixel UNet."""

from __future__ import annotations

import pytest
from PIL import Image

from apps.cli import main as cli_main
from apps.demo import DEMO_DIR
from apps.generate import Request, methods, samplers, samplers_for
from guidance import CFG, registry
from guidance.registry import Entry, Input, registered

needs_dit = pytest.mark.skipif(not (DEMO_DIR / "dit").is_dir(), reason="the demo DiT is not in demo_models/")
needs_unet = pytest.mark.skipif(not (DEMO_DIR / "unet").is_dir(), reason="the demo UNet is not in demo_models/")


def test_inputs_check_type_range_and_choices():
    scale = Input("scale", float, 4.0, low=0.0, high=10.0)
    assert scale.check(3) == 3.0 and isinstance(scale.check(3), float)
    for bad in (-1.0, 11.0, float("nan"), "3", True, None):
        with pytest.raises(ValueError, match="scale"):
            scale.check(bad)
    assert Input("r", float, None, optional=True).check(None) is None
    with pytest.raises(ValueError, match="integer"):
        Input("steps", int, 1).check(1.5)
    with pytest.raises(ValueError, match="one of"):
        Input("mode", str, "a", choices=("a", "b")).check("c")
    with pytest.raises(ValueError, match=r"\[0.0, 10.0\]"):
        Input("scale", float, 20.0, low=0.0, high=10.0)  # a default outside its own range
    step = Input("step", float, 0.5, low=0.0, positive=True)
    assert step.check(1e-9) == 1e-9
    with pytest.raises(ValueError, match=r"greater than 0\.0"):
        step.check(0)


def test_score_sampler_step_size_and_snr_are_refused_at_zero_when_checked():
    """Zero would make the Langevin step vanish: refused by the registry's check (the app's and CLI's), not
    only later by the sampler at run time."""
    for entry_name, name in (("langevin", "epsilon"), ("pc", "snr")):
        (spec,) = [i for i in registry.get("score_sampler", entry_name).inputs if i.name == name]
        with pytest.raises(ValueError, match=name):
            spec.check(0.0)
        assert spec.check(0.01) == 0.01


def test_registry_lists_every_method_and_sampler_and_refuses_duplicates():
    assert registry.names("guidance") == ("cfg", "apg")
    assert registry.names("perturbation") == ("pag", "softpag", "tpg", "slg")
    assert samplers() == ("default", "ddim", "dpm++", "euler", "unipc", "langevin", "pc")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("guidance", "cfg"))
    with pytest.raises(ValueError, match="unknown guidance 'nope'; known: cfg, apg"):
        registry.get("guidance", "nope")
    slg = registry.get("perturbation", "slg")({"scale": 1.5}, None)
    assert (slg.scale, slg.layers, slg.start, slg.stop) == (1.5, "auto", 0.0, 1.0)  # the middle block, all steps
    apg = registry.get("guidance", "apg")({"scale": 5.0, "momentum": None}, None)
    assert apg.scale == 5.0 and apg.eta == 0.0  # the defaults of the inputs not given
    with pytest.raises(ValueError, match="eta"):
        Request("star", method="apg", eta=2.0)  # the entry's range, checked when the request is made


@needs_dit
def test_a_method_registered_in_a_test_appears_in_the_cli_and_the_app(capsys, tmp_path):
    half = Entry(
        "half_cfg",
        "guidance",
        (Input("scale", float, 4.0, low=0.0), Input("boost", float, 1.0, low=0.0, high=2.0, help="boost factor")),
        build=lambda values, pipe: CFG(values["scale"] * values["boost"] / 2),
    )
    with registered(half):
        with pytest.raises(SystemExit):
            cli_main(["generate", "--help"])
        help_text = capsys.readouterr().out
        assert "half_cfg" in help_text and "--boost" in help_text and "boost factor" in help_text
        args = ["generate", "star", "--method", "half_cfg", "--boost", "1.5", "--steps", "2", "--num-images", "1"]
        assert cli_main([*args, "--out", str(tmp_path), "--device", "cpu"]) == 0
        assert Image.open(next(tmp_path.glob("*half_cfg*.png"))).size == (32, 32)

        from apps.app import build_app

        app = build_app("demo/dit", device="cpu")
        blocks = list(app.blocks.values())
        (method,) = [b for b in blocks if getattr(b, "elem_id", None) == "generate-method"]
        assert "half_cfg" in [value for _, value in method.choices]
        assert any("boost factor (half_cfg)" == getattr(b, "label", None) for b in blocks)  # its own control

    assert "half_cfg" not in methods() and "boost" not in str(registry.inputs("guidance"))


@needs_unet
@pytest.mark.parametrize("sampler", ["langevin", "pc"])
def test_score_samplers_run_from_the_cli_on_the_demo_unet(sampler, tmp_path, capsys):
    args = ["generate", "-", "--model", "demo/unet", "--method", "none", "--sampler", sampler, "--steps", "3"]
    args += ["--num-images", "2", "--device", "cpu"]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0
    first, second = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert len(first) == 2 and all(Image.open(p).size == (16, 16) for p in first)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]  # same seed, same images
    # guidance does not apply to an unconditional model: a clear error, exit status 2
    assert cli_main(["generate", "-", "--model", "demo/unet", "--sampler", sampler, "--out", str(tmp_path)]) == 2
    assert "unconditional" in capsys.readouterr().err


@needs_dit
def test_score_samplers_are_offered_only_to_unconditional_unets(capsys, tmp_path):
    from apps.services import load_pipeline

    dit = load_pipeline("demo/dit", "cpu")
    assert "langevin" not in samplers_for(dit) and "ddim" in samplers_for(dit)
    args = ["generate", "star", "--method", "none", "--sampler", "pc", "--steps", "2", "--out", str(tmp_path)]
    assert cli_main([*args, "--device", "cpu"]) == 2
    assert "unconditional UNet" in capsys.readouterr().err
    if (DEMO_DIR / "unet").is_dir():
        assert {"langevin", "pc"} <= set(samplers_for(load_pipeline("demo/unet", "cpu")))


def test_samplers_are_refused_for_models_on_log_sigma_timesteps():
    """EDM schedulers and continuous-timestep v-prediction feed the model log-sigma: a DDPM-table sampler would
    silently feed it discrete steps."""
    import diffusers

    from tests.factories import tiny_sd

    pipe = tiny_sd("v_prediction")
    base = dict(pipe.scheduler.config)
    pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler()
    for name in ("ddim", "dpm++", "euler", "unipc"):
        with pytest.raises(ValueError, match="log-sigma timesteps"):
            registry.get("scheduler", name)({}, pipe)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base, timestep_type="continuous")
    for name in ("ddim", "dpm++", "unipc"):
        with pytest.raises(ValueError, match="only the default sampler or euler serves it"):
            registry.get("scheduler", name)({}, pipe)
    euler = registry.get("scheduler", "euler")({}, pipe)
    assert euler.config.timestep_type == "continuous"
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base)  # discrete timesteps: any sampler
    assert type(registry.get("scheduler", "ddim")({}, pipe)).__name__ == "DDIMScheduler"


def test_an_int_too_large_for_a_float_is_a_clear_error():
    from guidance import APG

    spec = Input("scale", float, 4.0, low=0.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        spec.check(10**400)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        APG(10**400)


def test_the_app_slider_of_a_positive_input_starts_above_its_bound():
    gr = pytest.importorskip("gradio")
    from apps.tabs.generate import control

    snr = Input("snr", float, 0.16, low=0.0, high=1.0, step=0.01, positive=True)
    slider = control(gr, "snr", snr, ("pc",))
    assert slider.minimum == pytest.approx(0.01) and slider.maximum == 1.0
    plain = control(gr, "scale", Input("scale", float, 4.0, low=0.0, high=10.0), ("cfg",))
    assert plain.minimum == 0.0
