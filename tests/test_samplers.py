"""Denoiser adapters and score-based samplers against analytic Gaussians and a tiny UNet."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from guidance import prediction as P
from guidance.denoisers import (
    DiffusersDenoiser,
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    per_sample,
    score,
)
from guidance.samplers import (
    PREDICTORS,
    SAMPLERS,
    Step,
    geometric_sigmas,
    langevin_correct,
    sample_annealed_langevin,
    sample_predictor_corrector,
)
from tests.factories import tiny_pixel_unet

F64 = torch.float64
MEAN_2D = torch.tensor([1.0, -0.5], dtype=F64)
VAR_2D = torch.tensor([0.1, 0.05], dtype=F64)
MIXTURE = GaussianMixtureDenoiser(torch.tensor([[-2.0], [2.0]], dtype=F64), 0.1, torch.tensor([0.3, 0.7], dtype=F64))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _cheap_run(name, x, generator, **options):
    gaussian = GaussianDenoiser(MEAN_2D, VAR_2D)
    sigmas = geometric_sigmas(1.0, 0.1, 3)
    if name == "annealed_langevin":
        options.setdefault("steps_per_level", 3)
    return SAMPLERS[name](gaussian, x, sigmas, generator=generator, **options)


# --- denoisers: exact scores ---


def test_gaussian_score_is_analytic():
    x, sigma = _randn(5, 2), torch.tensor([0.01, 0.3, 1.0, 4.0, 50.0], dtype=F64)
    expected = -(x - MEAN_2D) / (VAR_2D + sigma[:, None] ** 2)
    torch.testing.assert_close(score(GaussianDenoiser(MEAN_2D, VAR_2D), x, sigma), expected)


@pytest.mark.parametrize("dim", [1, 2])
def test_mixture_score_is_the_gradient_of_the_noisy_log_density(dim):
    means = torch.tensor([[-2.0, 1.0], [1.5, 0.5]], dtype=F64)[:, :dim]
    weights, var = torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([0.2, 0.05], dtype=F64)[:dim]
    x, sigma = _randn(6, dim).mul(2).requires_grad_(), torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0], dtype=F64)
    noisy = torch.distributions.Normal(means, (var + sigma[:, None, None] ** 2).sqrt())  # (B, K, dim)
    log_p = torch.logsumexp(weights.log() + noisy.log_prob(x[:, None]).sum(-1), dim=1)
    (expected,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(score(GaussianMixtureDenoiser(means, var, weights), x.detach(), sigma), expected)


def test_one_component_mixture_is_the_gaussian():
    x, sigma = _randn(4, 3, 2, 2), torch.tensor([0.1, 1.0, 2.0, 9.0], dtype=F64)
    mean, var = _randn(3, 2, 2, seed=1), 0.3
    one = GaussianMixtureDenoiser(mean[None], var, torch.ones(1))
    torch.testing.assert_close(one(x, sigma), GaussianDenoiser(mean, var)(x, sigma))


def test_denoisers_follow_the_input_dtype_and_accept_a_scalar_sigma():
    x = torch.randn(3, 2, generator=_gen(0))
    for model in (GaussianDenoiser(MEAN_2D, VAR_2D), MIXTURE):
        out = model(x[:, :1] if model is MIXTURE else x, torch.tensor(0.5))
        assert out.dtype == torch.float32
    assert per_sample(0.5, x).shape == (3,)
    with pytest.raises(ValueError, match="entries for a batch"):
        per_sample(torch.ones(2), x)


# --- samplers recover the data distribution ---


def test_annealed_langevin_recovers_a_2d_gaussian():
    gaussian = GaussianDenoiser(MEAN_2D, VAR_2D)
    sigmas = geometric_sigmas(1.0, 0.03, 8)
    x = sample_annealed_langevin(
        gaussian, _randn(4000, 2), sigmas, steps_per_level=100, epsilon=9e-4, generator=_gen(1)
    )
    torch.testing.assert_close(x.mean(0), MEAN_2D, atol=0.025, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), VAR_2D.diag(), atol=0.008, rtol=0.08)


def test_annealed_langevin_finds_the_mixture_weights():
    sigmas = geometric_sigmas(4.0, 0.05, 8)
    x = sample_annealed_langevin(
        MIXTURE, 4 * _randn(2000, 1), sigmas, steps_per_level=50, epsilon=2e-3, generator=_gen(1)
    )[:, 0]
    right = x > 0
    assert abs(right.double().mean() - 0.7) < 0.05
    for part, mean in ((x[right], 2.0), (x[~right], -2.0)):
        assert abs(part.mean() - mean) < 0.05
        assert abs(part.var() / 0.1 - 1) < 0.25


def test_predictor_alone_recovers_the_2d_gaussian_and_the_mixture():
    sigmas = geometric_sigmas(20.0, 0.01, 200)
    gaussian = GaussianDenoiser(MEAN_2D, VAR_2D)
    x = sample_predictor_corrector(gaussian, 20 * _randn(4000, 2), sigmas, corrector_steps=0, generator=_gen(1))
    torch.testing.assert_close(x.mean(0), MEAN_2D, atol=0.025, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), VAR_2D.diag(), atol=0.008, rtol=0.1)
    x = sample_predictor_corrector(MIXTURE, 20 * _randn(2000, 1), sigmas, corrector_steps=0, generator=_gen(2))
    assert abs((x > 0).double().mean() - 0.7) < 0.03


@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_predictor_corrector_recovers_a_gaussian(predictor):
    # the per-sample step 2 (r ||z|| / ||s||)^2 needs many dimensions for ||z|| and ||s|| to concentrate
    dim, n = 256, 125
    mean, var = torch.linspace(-1, 1, dim, dtype=F64), torch.linspace(0.05, 0.2, dim, dtype=F64)
    sigmas = geometric_sigmas(5.0, 0.01, 40)
    x = sample_predictor_corrector(
        GaussianDenoiser(mean, var), 5 * _randn(n, dim), sigmas, predictor=predictor, generator=_gen(1)
    )
    assert (x.mean(0) - mean).abs().max() < 5 * (var.max() / n) ** 0.5
    assert abs((x.var(0) / var).mean() - 1) < 0.1


# --- at equilibrium the correctors keep the noisy marginal (batch-mean step size, as score_sde) ---

EQ_N, EQ_SIGMA = 40000, 0.5


def _gaussian_marginal(seed=0):
    """Exact samples of the 2-D Gaussian's noisy marginal ``N(mean, var + sigma^2)`` at ``EQ_SIGMA``."""
    return MEAN_2D + (VAR_2D + EQ_SIGMA**2).sqrt() * _randn(EQ_N, 2, seed=seed)


def _mixture_marginal(seed=0):
    right = torch.rand(EQ_N, generator=_gen(seed), dtype=F64) < 0.7
    return torch.where(right, 2.0, -2.0)[:, None] + (0.1 + EQ_SIGMA**2) ** 0.5 * _randn(EQ_N, 1, seed=seed + 1)


def _mode_weight_tolerance(p=0.7, n=EQ_N):
    return 4 * (p * (1 - p) / n) ** 0.5  # four standard errors of a binomial proportion


@pytest.mark.parametrize(("steps", "snr"), [(1, 0.16), (50, 0.1)])
def test_langevin_correct_keeps_the_gaussian_marginal(steps, snr):
    # with the per-sample step 2 (r ||z_b|| / ||s_b||)^2 the variance grew x4 after one step, x13 after 50.
    # Unadjusted Langevin's own bias at equilibrium is a variance ratio of about 1 / (1 - r^2) (+2.6 % at
    # r = 0.16), so the 3 % bound over 50 steps is checked at r = 0.1.
    x = _gaussian_marginal()
    y, _ = langevin_correct(GaussianDenoiser(MEAN_2D, VAR_2D), x, EQ_SIGMA, steps=steps, snr=snr, generator=_gen(1))
    ratio = y.var(0) / (VAR_2D + EQ_SIGMA**2)
    assert ((ratio - 1).abs() < 0.03).all(), ratio
    assert ((y.mean(0) - MEAN_2D).abs() < 0.02).all()


def test_langevin_correct_keeps_the_mixture_weights():
    x = _mixture_marginal(2)
    y, _ = langevin_correct(MIXTURE, x, EQ_SIGMA, steps=50, generator=_gen(4))
    assert abs((y > 0).double().mean() - 0.7) < _mode_weight_tolerance()


def test_annealed_langevin_keeps_the_marginal_at_one_level():
    level = torch.tensor([EQ_SIGMA])
    y = sample_annealed_langevin(
        GaussianDenoiser(MEAN_2D, VAR_2D),
        _gaussian_marginal(),
        level,
        steps_per_level=50,
        epsilon=2e-3,
        final_denoise=False,
        generator=_gen(1),
    )
    ratio = y.var(0) / (VAR_2D + EQ_SIGMA**2)
    assert ((ratio - 1).abs() < 0.03).all(), ratio
    y = sample_annealed_langevin(
        MIXTURE, _mixture_marginal(2), level, steps_per_level=50, epsilon=2e-3, final_denoise=False, generator=_gen(4)
    )
    assert abs((y > 0).double().mean() - 0.7) < _mode_weight_tolerance()


def test_predictor_corrector_with_corrector_recovers_the_gaussian_and_the_mixture_weights():
    # the per-sample step put 0.467 of the samples in the 0.3-weight mode; the batch-mean step 0.3.
    # r = 0.1 for the 3 % variance bound (see above: at r = 0.16 the ratio is 1.016 / 1.035)
    sigmas = geometric_sigmas(20.0, 0.01, 200)
    gaussian = GaussianDenoiser(MEAN_2D, VAR_2D)
    x = sample_predictor_corrector(gaussian, 20 * _randn(EQ_N, 2, seed=5), sigmas, snr=0.1, generator=_gen(6))
    ratio = x.var(0) / VAR_2D
    assert ((ratio - 1).abs() < 0.03).all(), ratio
    assert ((x.mean(0) - MEAN_2D).abs() < 0.01).all()
    x = sample_predictor_corrector(MIXTURE, 20 * _randn(EQ_N, 1, seed=7), sigmas, generator=_gen(8))
    assert abs((x > 0).double().mean() - 0.7) < _mode_weight_tolerance()


# --- sampler mechanics ---


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeded_runs_reproduce_and_differ_across_seeds(name):
    x = _randn(4, 2)
    first, again = _cheap_run(name, x, _gen(7)), _cheap_run(name, x, _gen(7))
    assert torch.equal(first, again)
    assert not torch.allclose(first, _cheap_run(name, x, _gen(8)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_per_sample_generators_make_samples_independent_of_the_batch(name):
    # the corrector's step size is a batch mean (score_sde), so the predictor-corrector runs without it here
    options = {"corrector_steps": 0} if name == "predictor_corrector" else {}
    x = _randn(3, 2)
    batch = _cheap_run(name, x, [_gen(s) for s in (10, 11, 12)], **options)
    for row, seed in enumerate((10, 11, 12)):
        single = _cheap_run(name, x[row : row + 1], [_gen(seed)], **options)
        torch.testing.assert_close(batch[row : row + 1], single)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_global_rng_is_never_touched(name):
    state = torch.get_rng_state()
    _cheap_run(name, _randn(2, 2), _gen(0))
    _cheap_run(name, _randn(2, 2), None)
    assert torch.equal(torch.get_rng_state(), state)


def test_callback_reports_every_level_and_the_final_denoising_step():
    steps, gaussian = [], GaussianDenoiser(MEAN_2D, VAR_2D)
    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.0])
    x = sample_annealed_langevin(
        gaussian, _randn(5, 2), sigmas, steps_per_level=2, generator=_gen(0), callback=steps.append
    )
    assert [s.i for s in steps] == [0, 1, 2]
    assert [s.sigma for s in steps] == [2.0, 1.0, 0.5]
    assert all(isinstance(s, Step) and s.x.shape == s.denoised.shape == (5, 2) for s in steps)
    # the result is E[x0 | x] at the last level
    torch.testing.assert_close(x, gaussian(steps[-1].x, torch.full((5,), 0.5, dtype=F64)))


def test_predictor_corrector_callback_and_noise_free_last_step():
    steps, gaussian = [], GaussianDenoiser(MEAN_2D, VAR_2D)
    x = sample_predictor_corrector(
        gaussian, _randn(5, 2), torch.tensor([2.0, 1.0, 0.5]), generator=_gen(0), callback=steps.append
    )
    assert [(s.i, s.sigma) for s in steps] == [(0, 2.0), (1, 1.0), (2, 0.5)]
    # the last reverse-diffusion step to sigma = 0 returns its mean: Tweedie's denoised estimate
    torch.testing.assert_close(x, steps[-1].denoised)


def test_a_trailing_zero_changes_nothing():
    x, gaussian = _randn(4, 2), GaussianDenoiser(MEAN_2D, VAR_2D)
    for sampler in SAMPLERS.values():
        without = sampler(gaussian, x, torch.tensor([1.0, 0.3]), generator=_gen(3))
        with_zero = sampler(gaussian, x, torch.tensor([1.0, 0.3, 0.0]), generator=_gen(3))
        assert torch.equal(without, with_zero)


def test_langevin_correct_alone():
    gaussian, x = GaussianDenoiser(MEAN_2D, VAR_2D), _randn(4, 2)
    same, mean = langevin_correct(gaussian, x, 0.3, steps=0)
    assert same is x and mean is x
    out, out_mean = langevin_correct(gaussian, x, torch.full((4,), 0.3, dtype=F64), steps=2, generator=_gen(0))
    again, _ = langevin_correct(gaussian, x, 0.3, steps=2, generator=_gen(0))
    assert torch.equal(out, again) and not torch.equal(out, out_mean)


def test_geometric_sigmas():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    torch.testing.assert_close(sigmas[[0, -1]], torch.tensor([1.0, 0.01], dtype=F64))
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([1.0, 2.0])), "strictly decreasing"),
        (lambda m, x: sample_predictor_corrector(m, x, torch.tensor([1.0, 1.0])), "strictly decreasing"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([1.0, 0.0, 0.5])), "positive"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([1.0, float("nan")])), "finite"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.ones(2, 2)), "1-D"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([])), "positive"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([1.0]), epsilon=-1e-5), "epsilon"),
        (lambda m, x: sample_annealed_langevin(m, x, torch.tensor([1.0]), steps_per_level=0), "steps_per_level"),
        (lambda m, x: sample_predictor_corrector(m, x, torch.tensor([1.0]), snr=-0.1), "snr"),
        (lambda m, x: sample_predictor_corrector(m, x, torch.tensor([1.0]), predictor="heun"), "unknown predictor"),
        (lambda m, x: sample_predictor_corrector(m, x, torch.tensor([1.0]), corrector_steps=1.5), "steps"),
        (lambda m, x: sample_predictor_corrector(m, x[0], torch.tensor([1.0])), "batch"),
        (lambda m, x: sample_predictor_corrector(m, x, torch.tensor([1.0]), generator=[_gen(0)]), "generators"),
        (lambda m, x: sample_annealed_langevin(lambda x, s: x[:, :1], x, torch.tensor([1.0])), "returned shape"),
        (lambda m, x: geometric_sigmas(0.1, 1.0, 5), "sigma_max"),
        (lambda m, x: geometric_sigmas(1.0, 0.0, 5), "sigma_min"),
    ],
)
def test_bad_inputs_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(GaussianDenoiser(MEAN_2D, VAR_2D), _randn(3, 2))


def test_bad_denoiser_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="positive"):
        GaussianDenoiser(MEAN_2D, -1.0)
    with pytest.raises(ValueError, match="weight per component"):
        GaussianMixtureDenoiser(torch.zeros(2, 1), 0.1, torch.ones(3))
    with pytest.raises(ValueError, match="neither a VP nor a flow"):
        DiffusersDenoiser(torch.nn.Identity(), {"prediction_type": "edm", "beta_start": 1e-4})
    with pytest.raises(ValueError, match="continuous-time"):
        DiffusersDenoiser(
            torch.nn.Identity(), EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
        )
    with pytest.raises(ValueError, match="without betas"):
        DiffusersDenoiser(torch.nn.Identity(), {"num_train_timesteps": 1000})


# --- the diffusers adapter ---


@pytest.fixture(scope="module")
def unet():
    model = tiny_pixel_unet()
    return model.double().eval()


class _FromEps(torch.nn.Module):
    """The reference eps-network ``f(x_t, t)`` re-expressed as another prediction on its own schedule."""

    def __init__(self, eps_model, kind, alphas_cumprod=None):
        super().__init__()
        self.eps_model, self.kind, self.alphas_cumprod = eps_model, kind, alphas_cumprod

    def forward(self, sample, timestep):
        eps = self.eps_model(sample, timestep).sample
        if self.kind == "flow":
            alpha, sigma = 1 - timestep / 1000, timestep / 1000
        else:
            alpha, sigma = P.vp_discrete(self.alphas_cumprod, timestep)
        alpha, sigma = P.broadcast(alpha, sample), P.broadcast(sigma, sample)
        x0 = (sample - sigma * eps) / alpha
        if self.kind == "v_prediction":
            return (alpha * eps - sigma * x0,)  # a tuple, as with return_dict=False
        if self.kind == "flow":
            return (eps - x0,)
        if self.kind == "learned_sigma":
            return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)
        return x0  # a bare tensor


SIGMAS = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=F64)


def test_vp_views_of_one_network_agree(unet):
    scheduler = DDPMScheduler()
    ac = scheduler.alphas_cumprod
    x = _randn(4, 3, 8, 8)
    eps_view = DiffusersDenoiser(unet, scheduler)
    x0 = eps_view(x, SIGMAS)
    # x0 = x - sigma * f(x / sqrt(1 + sigma^2), t(sigma))
    x_in, t = x / P.broadcast((1 + SIGMAS**2).sqrt(), x), eps_view.sigma_to_t(SIGMAS)
    expected = x - P.broadcast(SIGMAS, x) * unet(x_in, t).sample
    torch.testing.assert_close(x0, expected)
    for kind in ("v_prediction", "sample"):
        view = DiffusersDenoiser(_FromEps(unet, kind, ac), DDPMScheduler(prediction_type=kind))
        torch.testing.assert_close(view(x, SIGMAS), x0, atol=1e-5, rtol=1e-5)
    learned_sigma = DiffusersDenoiser(_FromEps(unet, "learned_sigma", ac), scheduler.config)
    torch.testing.assert_close(learned_sigma(x, SIGMAS), x0)


def test_flow_view_of_the_network(unet):
    x = _randn(4, 3, 8, 8)
    for scheduler in (FlowMatchEulerDiscreteScheduler(), {"_class_name": "FlowMatchEulerDiscreteScheduler"}):
        view = DiffusersDenoiser(_FromEps(unet, "flow"), scheduler)
        s = P.broadcast(SIGMAS, x)
        expected = x - s * unet(x / (1 + s), 1000 * SIGMAS / (1 + SIGMAS)).sample
        torch.testing.assert_close(view(x, SIGMAS), expected, atol=1e-5, rtol=1e-5)


def test_vp_sigma_and_timestep_round_trip():
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012)
    view = DiffusersDenoiser(torch.nn.Identity(), sd)
    t = torch.tensor([0.0, 0.5, 17.25, 500.7, 998.9, 999.0])
    torch.testing.assert_close(view.sigma_to_t(view.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    sigma = torch.tensor([view.sigma_min, 0.1, 1.0, 7.5, view.sigma_max], dtype=F64)
    torch.testing.assert_close(view.t_to_sigma(view.sigma_to_t(sigma)).double(), sigma, atol=0, rtol=1e-5)
    # the same fractional timesteps as diffusers' own log-sigma interpolation
    euler = EulerDiscreteScheduler.from_config(sd.config)
    log_sigmas = np.log(((1 - euler.alphas_cumprod.numpy()) / euler.alphas_cumprod.numpy()) ** 0.5)
    theirs = euler._sigma_to_t(sigma.numpy(), log_sigmas)
    torch.testing.assert_close(view.sigma_to_t(sigma).double(), torch.from_numpy(theirs), atol=1e-3, rtol=0)
    ac = view.alphas_cumprod
    assert view.sigma_min == pytest.approx(((1 - ac[0]) / ac[0]).sqrt().item(), rel=1e-5)
    assert view.sigma_max == pytest.approx(((1 - ac[-1]) / ac[-1]).sqrt().item(), rel=1e-5)


def test_flow_sigma_and_timestep_round_trip():
    view = DiffusersDenoiser(torch.nn.Identity(), FlowMatchEulerDiscreteScheduler())
    t = torch.tensor([1.0, 2.5, 500.0, 998.5])
    torch.testing.assert_close(view.sigma_to_t(view.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    assert view.sigma_min == pytest.approx(1 / 999) and view.sigma_max == pytest.approx(999, rel=1e-4)


def test_zero_terminal_snr_keeps_the_finite_part_of_the_table():
    for scheduler in (EulerDiscreteScheduler(rescale_betas_zero_snr=True), DDPMScheduler(rescale_betas_zero_snr=True)):
        view = DiffusersDenoiser(torch.nn.Identity(), scheduler)
        assert len(view.log_sigmas) == 999
        assert view.log_sigmas.isfinite().all() and (view.log_sigmas.diff() > 0).all()


def test_model_kwargs_are_merged_per_call():
    seen = {}

    def model(sample, timestep, **kwargs):
        seen.update(kwargs)
        return (torch.zeros_like(sample),)

    view = DiffusersDenoiser(model, DDPMScheduler(prediction_type="sample"), class_labels=1, encoder_hidden_states=2)
    view(_randn(2, 3, 4, 4), torch.tensor(1.0), class_labels=5)
    assert seen == {"class_labels": 5, "encoder_hidden_states": 2}


def test_samplers_run_a_diffusers_model(unet):
    view = DiffusersDenoiser(unet, DDPMScheduler())
    sigmas = geometric_sigmas(view.sigma_max, view.sigma_min, 2)
    x = view.sigma_max * _randn(2, 3, 8, 8)
    out = sample_predictor_corrector(view, x, sigmas, generator=_gen(0))
    assert out.shape == x.shape and out.isfinite().all()


def test_score_sampling_pipeline_gives_seeded_pil_images_whatever_the_batch(unet):
    from diffusers import DDPMScheduler

    from guidance.score_pipeline import ScoreSamplingPipeline

    pipe = ScoreSamplingPipeline(unet, DDPMScheduler())
    options = dict(num_levels=3, steps_per_level=2, epsilon=1e-4)
    images = pipe(2, generator=[_gen(0), _gen(1)], **options)
    assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "RGB"
    alone = pipe(1, generator=[_gen(1)], **options)
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(alone[0]))
    pc = pipe(2, sampler="predictor_corrector", generator=_gen(0), output_type="pt", num_levels=3)
    assert pc.shape == (2, 3, 8, 8) and 0 <= pc.min() and pc.max() <= 1
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe(1, sampler="ddim")
    with pytest.raises(ValueError, match="generators for a batch"):
        pipe(2, generator=[_gen(0)])


def test_score_sampling_pipeline_keeps_its_state_in_float32_with_a_half_precision_model():
    from diffusers import DDPMScheduler

    from guidance.score_pipeline import ScoreSamplingPipeline

    pipe = ScoreSamplingPipeline(tiny_pixel_unet().to(torch.bfloat16).eval(), DDPMScheduler())
    inner, seen = pipe.denoiser, []

    def recording(x, sigma, **kwargs):
        seen.append(x.dtype)
        return inner(x, sigma, **kwargs)

    pipe.denoiser = recording
    for sampler in ("annealed_langevin", "predictor_corrector"):
        images = pipe(
            2, sampler=sampler, generator=_gen(0), output_type="pt", num_levels=3, sigma_max=20.0, sigma_min=0.05
        )
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["annealed_langevin", "predictor_corrector"])
def test_half_precision_input_is_sampled_in_float32(sampler, dtype):
    """A half-precision start gives the float32 chain's result, rounded once at the end: the state never lives in
    half precision (bf16 rounded Langevin steps away, 4x the variance; fp16 overflowed sigma^2 above 256)."""
    from guidance.samplers import SAMPLERS, geometric_sigmas

    data = GaussianDenoiser(torch.tensor([1.5]), 0.01)
    start = torch.randn(256, 1, generator=torch.Generator().manual_seed(0)).to(dtype)
    sigmas = geometric_sigmas(300.0 if dtype == torch.float16 else 1.0, 0.01, 10)
    options = {"steps_per_level": 20, "epsilon": 2e-5} if sampler == "annealed_langevin" else {}
    half = (start.float() * sigmas[0].item()).to(dtype)  # one start, exactly representable in both
    runs = {}
    for kind in (dtype, torch.float32):
        x = half.to(kind)
        runs[kind] = SAMPLERS[sampler](data, x, sigmas, generator=torch.Generator().manual_seed(1), **options)
    assert runs[dtype].dtype == dtype and torch.isfinite(runs[dtype].float()).all()
    torch.testing.assert_close(runs[dtype], runs[torch.float32].to(dtype), rtol=0, atol=0)


def test_a_flux_transformer_gets_its_timestep_as_fluxpipeline_gives_it():
    """FluxTransformer2DModel multiplies its timestep by 1000 itself: FluxPipeline passes t / 1000, and so must the
    score view (it passed t, a noise level 1000x off)."""
    from tests.factories import tiny_flux

    pipe = tiny_flux()
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt="a", prompt_2=None, max_sequence_length=16)
    x = torch.randn(1, 16, pipe.transformer.config.in_channels)  # 16 packed latent tokens
    image_ids = torch.zeros(16, 3)
    view = DiffusersDenoiser(
        pipe.transformer,
        pipe.scheduler,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        txt_ids=text_ids,
        img_ids=image_ids,
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        view(x, torch.tensor([1.0]))  # VE sigma 1: flow sigma 0.5, t = 500
    hook.remove()
    torch.testing.assert_close(seen[0].float(), torch.tensor([0.5]))
