"""Pure-PyTorch samplers: I-CFM path, ODE solver orders, time grid, CFG, img2img, noise, callbacks."""
import math

import pytest
import torch

from oboro.oboro_model import MMHDiT, preset
from oboro.samplers import (NFE, SOLVERS, cfg_velocity, flow_shift, icfm_sample, prepare_noise, sample, sigma_grid,
                            solve, time_grid)

ORDERS = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    m = MMHDiT(preset("tiny", text_dim=32))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


# --- I-CFM ---

@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_icfm_matches_torchcfm(sigma):
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.rand(4, generator=g)
    xt, u = icfm_sample(x0, x1, t, sigma=sigma, eps=eps)
    fm = ConditionalFlowMatcher(sigma=sigma)
    want_xt = fm.sample_xt(x0, x1, t, eps)
    torch.testing.assert_close(xt, want_xt)
    torch.testing.assert_close(u, fm.compute_conditional_flow(x0, x1, t, want_xt))
    # the end points: t = 0 is noise, t = 1 is data
    torch.testing.assert_close(icfm_sample(x0, x1, torch.zeros(4))[0], x0)
    torch.testing.assert_close(icfm_sample(x0, x1, 1.0)[0], x1)


def test_icfm_straight_path_is_solved_exactly_by_euler():
    """Along one conditional path the velocity x1 - x0 is constant, so one Euler step is exact."""
    x0, x1 = torch.randn(2, 4), torch.randn(2, 4)
    out = solve(lambda x, t: icfm_sample(x0, x1, t)[1], x0, time_grid(1))
    torch.testing.assert_close(out, x1)


# --- solver orders on dx/dt = -2x + sin(5t): x(t) = (x0 + 5/29) e^(-2t) + (2 sin 5t - 5 cos 5t) / 29 ---

def _field(x, t):
    return -2 * x + math.sin(5 * t)


def _exact(x0, t):
    return (x0 + 5 / 29) * math.exp(-2 * t) + (2 * math.sin(5 * t) - 5 * math.cos(5 * t)) / 29


def _ode_error(solver, steps, open_end=False):
    x0 = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    x1 = solve(_field, x0, torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), solver, open_end=open_end)
    return (x1 - _exact(x0, 1.0)).abs().max().item()


def test_reference_solution_is_exact():
    assert _ode_error("rk4", 2048) < 1e-13


@pytest.mark.parametrize("open_end", [False, True])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_convergence_order(solver, open_end):
    """Error ratio when halving the step ~ 2^order, also when the last step may not touch t = 1."""
    p = ORDERS[solver]
    errs = [_ode_error(solver, n, open_end) for n in (32, 64, 128)]
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    print(solver, "open_end" if open_end else "", "errors", errs, "ratios", ratios, "expected", 2 ** p)
    for r in ratios:
        assert 2 ** (p - 0.25) < r < 2 ** (p + 0.25), (solver, errs, ratios)


def test_solver_costs_and_open_end():
    for open_end in (False, True):
        calls = {}
        for name in SOLVERS:
            ts = []
            solve(lambda x, t: ts.append(t) or -x, torch.ones(2), time_grid(5), name, open_end=open_end)
            calls[name] = len(ts)
            assert (max(ts) < 1.0) if open_end else (max(ts) == 1.0 or name in ("euler", "midpoint"))
        want = {k: 5 * v for k, v in NFE.items()}
        if open_end:
            want["rk4"] -= 1  # the last step is 3rd-order Ralston: 3 stages
        assert calls == want


def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver 'dopri5'"):
        solve(lambda x, t: x, torch.ones(1), time_grid(2), "dopri5")


# --- time grid ---

def test_time_grid_endpoints_and_shift():
    torch.testing.assert_close(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(time_grid(4, denoise=0.5), torch.tensor([0.5, 0.625, 0.75, 0.875, 1.0],
                                                                       dtype=torch.float64))
    for shift in (0.5, 1.0, 3.0):
        for denoise in (1.0, 0.6, 0.1):
            ts = time_grid(7, shift, denoise)
            assert ts.shape == (8,) and ts[0] == 1 - denoise and ts[-1] == 1.0
            assert (ts.diff() > 0).all()
    # denoise = 1: the shifted uniform grid, sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    s = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(sigma_grid(10, 3.0), 3 * s / (1 + 2 * s))
    # shift > 1 puts more steps near noise: the first step is smaller
    assert (time_grid(10, 3.0)[1] - time_grid(10, 3.0)[0]) < (time_grid(10)[1] - time_grid(10)[0])
    # a truncated grid follows the same warp: its sigmas sit on the full shifted curve
    u = sigma_grid(5, 3.0, 0.6) / (3.0 - 2.0 * sigma_grid(5, 3.0, 0.6))  # unwarp
    torch.testing.assert_close(u.diff(), torch.full((5,), -u[0].item() / 5, dtype=torch.float64))
    assert flow_shift(0.5, 1.0) == 0.5


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=4, denoise=1.5), dict(steps=4, shift=0.0)])
def test_time_grid_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        time_grid(**bad)


# --- CFG ---

def test_cfg_batched_equals_unbatched():
    dit = tiny_dit()
    x, t = torch.randn(2, 16, 4, 6), torch.tensor(0.3)
    pos = (torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    neg = (torch.randn(1, 2, 32), None)  # shorter, unmasked, broadcast over the batch
    with torch.no_grad():
        batched = cfg_velocity(dit, x, t, pos, neg, 5.0)
        single = cfg_velocity(dit, x, t, pos, neg, 5.0, batched=False)
        u_pos = dit(x, t.expand(2), *pos)
        u_neg = dit(x, t.expand(2), neg[0].expand(2, -1, -1))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, u_neg + 5.0 * (u_pos - u_neg), atol=1e-5, rtol=1e-5)
    assert (u_pos - u_neg).abs().max() > 1e-3  # the prompts matter, so the check has teeth


def test_cfg_one_skips_the_negative():
    calls = []

    def model(x, t, text, mask):
        calls.append(text.shape)
        return x * t[:, None] + text.mean()
    x = torch.randn(3, 2)
    out = cfg_velocity(model, x, 0.5, torch.ones(1, 4, 8), torch.zeros(1, 2, 8), cfg=1.0)
    assert calls == [(3, 4, 8)]
    torch.testing.assert_close(out, x * 0.5 + 1.0)


# --- img2img, denoise, noise, callbacks ---

def _never(*a):
    raise AssertionError("model called")


def test_denoise_zero_returns_the_input_latent():
    latent, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    out = sample(_never, noise, torch.ones(1, 3, 32), torch.ones(1, 3, 32), steps=5, latent=latent, denoise=0.0)
    assert torch.equal(out, latent)


@pytest.mark.parametrize("denoise", [1.0, 0.4])
def test_img2img_starts_from_noised_latent(denoise):
    latent, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    starts = []
    out = sample(lambda x, t, text, mask: torch.zeros_like(x), noise, torch.ones(1, 3, 32), None, steps=3,
                 latent=latent, denoise=denoise, callback=lambda i, n, x, d: starts.append(x))
    t0 = 1 - denoise
    torch.testing.assert_close(starts[0], t0 * latent + (1 - t0) * noise)
    torch.testing.assert_close(out, starts[0])  # zero velocity: stays put


def test_sample_with_model_is_deterministic_and_finite():
    dit = tiny_dit()
    noise = prepare_noise(torch.zeros(1, 16, 4, 6), seed=3)
    pos, neg = (torch.randn(1, 5, 32), torch.tensor([[1, 1, 1, 1, 0]])), torch.zeros(1, 1, 32)
    a = sample(dit, noise, pos, neg, steps=3, cfg=4.0, solver="heun", shift=3.0)
    b = sample(dit, noise, pos, neg, steps=3, cfg=4.0, solver="heun", shift=3.0)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_prepare_noise_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = prepare_noise(torch.zeros(2, 4, 3, 3), 42)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(42)
    assert torch.equal(a, torch.randn(2, 4, 3, 3))  # the default-generator stream ComfyUI draws
    big = 0xffffffffffffffff
    torch.manual_seed(big)
    assert torch.equal(prepare_noise(torch.zeros(1, 2), big), torch.randn(1, 2))
    # batch_index: sample i gets the batch_inds[i]-th draw
    per = prepare_noise(torch.zeros(3, 4, 3, 3), 42, batch_inds=[2, 0, 2])
    torch.manual_seed(42)
    draws = [torch.randn(1, 4, 3, 3) for _ in range(3)]
    assert torch.equal(per, torch.cat([draws[2], draws[0], draws[2]]))


def test_callback_sees_every_step_and_can_interrupt():
    seen = []
    x1 = torch.randn(2, 3)
    v = lambda x, t: (x1 - x) / (1 - t)  # the exact field toward one data point  # noqa: E731
    solve(v, torch.zeros(2, 3), time_grid(4)[:-1], "euler", lambda i, n, x, d: seen.append((i, n, d)))
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    for _, _, denoised in seen:
        torch.testing.assert_close(denoised, x1)  # predicted data sample

    class Stop(Exception):
        pass

    def cb(i, n, x, d):
        if i == 1:
            raise Stop
    with pytest.raises(Stop):
        solve(v, torch.zeros(2, 3), time_grid(4)[:-1], "rk4", cb)
