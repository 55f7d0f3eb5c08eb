"""Pure-PyTorch I-CFM training path and ODE samplers (no ComfyUI imports; nodes/sampling.py adapts
them to ComfyUI). Convention: t in [0, 1], t = 0 noise, t = 1 data, velocity u = x1 - x0."""
from .icfm import icfm_path, icfm_sample, icfm_target
from .ode import NFE, SOLVERS, cfg_velocity, flow_shift, prepare_noise, sample, sigma_grid, solve, time_grid

__all__ = ["icfm_path", "icfm_sample", "icfm_target", "NFE", "SOLVERS", "cfg_velocity", "flow_shift",
           "prepare_noise", "sample", "sigma_grid", "solve", "time_grid"]
