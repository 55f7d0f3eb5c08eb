"""Feature forecasting across sampling steps (TaylorSeer, and its confidence-gated variant).

A full step runs every block; between full steps the last block's output is forecast by a
polynomial through the last full steps' outputs, so blocks 1.. are skipped. TaylorSeer builds
the polynomial from finite differences over the step index; here they are divided differences
over the noise level the sampler asks for (Newton form), so the forecast is right for any step
grid and for solvers that evaluate between grid points (heun, midpoint): order k is exact for
features that are polynomials of degree <= k in sigma.

Gated (threshold > 0, "Forecasting When to Forecast"): every step still runs the first block and
forecasts *its* output the same way; if the forecast's relative error is under the threshold the
step trusts the last block's forecast, else it computes fully from the real first-block output
(so nothing is computed twice). Fixed (threshold 0): a full step every max_forecasts + 1 steps,
forecasting in between without running any block.

Pure PyTorch; the ComfyUI node (nodes/step_cache.py) hooks it into the block loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class StepCacheConfig:
    order: int = 2              # Taylor order: forecasts use up to order + 1 full steps
    warmup: int = 3             # full steps at the start of each run (per stream)
    max_forecasts: int = 3      # forecasts in a row before a full step is forced
    threshold: float = 0.0      # 0: fixed schedule; > 0: gated on the first block's relative error
    sigma_start: float = float("inf")  # forecast only while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0

    def __post_init__(self):
        if not 1 <= self.order <= 3:
            raise ValueError(f"order must be 1..3, got {self.order}")
        if self.warmup < 1 or self.max_forecasts < 0:
            raise ValueError(f"need warmup >= 1 and max_forecasts >= 0, got {self.warmup}, {self.max_forecasts}")
        if not self.threshold >= 0 or self.threshold == float("inf"):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold}")


class Forecaster:
    """Newton interpolation through the last order + 1 (sigma, feature) points."""

    def __init__(self, order: int):
        self.order, self.sigmas, self.features = order, [], []

    def __len__(self):
        return len(self.sigmas)

    def add(self, sigma: float, feature: torch.Tensor) -> None:
        if self.sigmas and sigma == self.sigmas[-1]:  # the same noise level again: keep the newest
            self.sigmas.pop(), self.features.pop()
        self.sigmas.append(float(sigma))
        self.features.append(feature.detach())
        del self.sigmas[:-(self.order + 1)], self.features[:-(self.order + 1)]

    def predict(self, sigma: float) -> torch.Tensor:
        """P(sigma) = f[n] + (s - s_n) f[n, n-1] + (s - s_n)(s - s_n-1) f[n, n-1, n-2] + ..."""
        s, f = self.sigmas[::-1], self.features[::-1]  # newest first
        coef, table = [f[0]], list(f)
        for k in range(1, len(s)):
            table = [(table[j] - table[j + 1]) / (s[j] - s[j + k]) for j in range(len(table) - 1)]
            coef.append(table[0])
        out, basis = coef[0], 1.0
        for k in range(1, len(coef)):
            basis = basis * (sigma - s[k - 1])
            out = out + basis * coef[k]
        return out


@dataclass
class Stream:
    """One cond/uncond chunk's state across a sampling run."""
    first: Forecaster
    last: Forecaster
    full_steps: int = 0
    forecasts_in_row: int = 0
    forecast_now: bool = False  # the decision for the model call in progress
    first_real: Optional[torch.Tensor] = None


@dataclass
class StepCache:
    """Per-run state of every stream, plus counts for benchmarks and tests."""
    cfg: StepCacheConfig
    streams: dict = field(default_factory=dict)
    full: int = 0
    forecast: int = 0

    def reset(self) -> None:
        self.streams.clear()
        self.full = self.forecast = 0

    def stream(self, key) -> Stream:
        if key not in self.streams:
            self.streams[key] = Stream(Forecaster(self.cfg.order), Forecaster(self.cfg.order))
        return self.streams[key]

    def may_forecast(self, st: Stream, sigma: float) -> bool:
        c = self.cfg
        return (st.full_steps >= c.warmup and st.forecasts_in_row < c.max_forecasts
                and c.sigma_end <= sigma <= c.sigma_start and len(st.last) > 0)

    def begin(self, key, sigma: float) -> Stream:
        """Start of a model call. Fixed mode decides here; gated mode after the first block."""
        st = self.stream(key)
        st.forecast_now = self.cfg.threshold == 0 and self.may_forecast(st, sigma)
        return st

    def after_first_block(self, st: Stream, sigma: float, real: torch.Tensor) -> bool:
        """Gated mode: trust the forecast when the first block's forecast error is small enough."""
        st.first_real = real
        if self.cfg.threshold > 0 and self.may_forecast(st, sigma) and len(st.first) > 0:
            pred = st.first.predict(sigma)
            err = (pred - real).float().norm() / real.float().norm().clamp_min(1e-12)
            st.forecast_now = bool(err < self.cfg.threshold)
        return st.forecast_now

    def finish(self, st: Stream, sigma: float, last_out: Optional[torch.Tensor]) -> torch.Tensor:
        """End of a model call: record a full step's outputs, or return the forecast."""
        if st.forecast_now:
            st.forecasts_in_row += 1
            self.forecast += 1
            return st.last.predict(sigma)
        st.forecasts_in_row = 0
        st.full_steps += 1
        self.full += 1
        if st.first_real is not None:
            st.first.add(sigma, st.first_real)
        st.last.add(sigma, last_out)
        st.first_real = None
        return last_out
