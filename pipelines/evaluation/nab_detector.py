"""Streaming detectors for NAB-style univariate series (fit on the probationary prefix, then causal).

Pipeline per series (no per-file settings; labels are never seen):

1. scale with the prefix's median and robust range; clip to +-``clip``;
2. raw error per row:
   * ``gru`` / ``lstm``: a tiny sequence autoencoder trained on the prefix's windows; the error is the
     newest step's absolute reconstruction error of the window ending on the row. With ``finetune_every``
     the model is refined in chunks on recent windows: rows of chunk ``[a, b)`` are scored by the model
     trained on rows ``< a`` only, and the model is then refined on rows ``< b``;
     options (off by default, see benchmarks/RESULTS.md): ``target="predict"`` hides the newest value from
     the model (held at the previous one), so its error is a one-step forecast error; ``ensemble=N`` averages
     the errors of N models with consecutive seeds (``target="both"``: of a reconstructing and a predicting one);
   * ``gaussian`` (baseline): ``|z|`` of the value against the mean/std of the previous ``gauss_window``
     rows (NAB's windowed Gaussian);
3. seasonal floor (``seasonal_periods``, when the runner knows the rows per day): the raw error minus the
   error seen at the same time of day on each of the previous days (``likelihood.seasonal_floor``), so a
   daily pattern that a short window cannot explain stops looking new every day;
4. channels, each a score in [0, 1]: the anomaly log-likelihood (see ``likelihood``) of
   * the (floored) raw error above,
   * for the autoencoders also the windowed-Gaussian ``|z|`` (``level_channel``: level shifts that a model
     on a scaled window reconstructs well),
   * the absolute first difference (``diff_channel``: sudden changes),
   each Bonferroni-corrected for the number of such channels (``p -> K p``: K tests at once would otherwise
   raise K times as many false alarms), and the spatial novelty rule (values outside everything seen so far);
5. score = max over channels, then an alert hold: after a row reaches ``alarm_level`` the next ``hold`` rows
   are zeroed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from detector.models import ModelConfig, build_model, model_cost
from pipelines.evaluation.likelihood import (
    anomaly_loglik,
    past_mean_std,
    seasonal_floor,
    spatial_novelty,
    suppress_after_alarm,
)

MODEL_KINDS = ("gru", "lstm", "gaussian")
# Settings that change the raw errors (the rest only change their post-processing).
RAW_ERROR_FIELDS = ("kind", "window", "hidden_size", "latent_size", "epochs", "batch_size", "lr", "finetune_every",
                    "finetune_steps", "finetune_history", "last_weight", "gauss_window", "clip", "seed")
# Raw-error settings added later: part of the cache key only when not at their default (older caches stay valid).
RAW_ERROR_FIELDS_NEW = ("target",)


@dataclass(frozen=True)
class NabDetectorConfig:
    """Settings shared by every file of a corpus."""

    kind: str = "gru"  # "gru" | "lstm" | "gaussian"
    window: int = 16  # W of the autoencoder
    hidden_size: int = 16
    latent_size: int = 4
    epochs: int = 20  # passes over the prefix's windows
    batch_size: int = 64
    lr: float = 3e-3
    finetune_every: int = 128  # rows per online fine-tuning chunk (0: frozen model)
    finetune_steps: int = 4  # Adam steps per chunk
    finetune_history: int = 1000  # fine-tune on windows from this many most recent rows
    last_weight: float = 0.0  # extra loss weight on the newest step (the one that is scored)
    gauss_window: int = 6400  # history of the windowed-Gaussian baseline
    clip: float = 20.0  # scaled values are clipped to +-clip
    avg: int = 10  # short-term mean of the error (anomaly likelihood)
    history: int = 8640  # long-term distribution of the short-term mean
    ae_long_avg: int = 0  # autoencoders: extra likelihood channel of the error's mean over this many rows (0: off)
    min_std: float = 1e-3
    seen_before: int = 0  # floor p by the past frequency of equally large errors (0: off)
    ae_seen_before: int = -1  # autoencoder channel's own seen_before (-1: same as seen_before)
    level_channel: bool = True  # autoencoders: add the likelihood of the windowed-Gaussian |z|
    diff_channel: bool = True  # add the likelihood of |x_t - x_{t-1}|
    bonferroni: bool = True  # correct each likelihood channel for the number of channels
    spatial_margin: float | None = 0.05  # None: no spatial-novelty channel
    alarm_level: float = 0.5  # 0.5 = tail probability 1e-5
    hold: int = 100  # rows zeroed after an alarm
    postprocess: bool = True  # False: score = raw error squashed to [0, 1] (no channels, likelihood or hold)
    seed: int = 0
    # autoencoders: "reconstruct" the window, "predict" its (masked) newest step, or "both" (mean of two models)
    target: str = "reconstruct"
    ensemble: int = 1  # autoencoders: mean newest-step error of this many models (seeds seed, seed+1, ...)
    seasonal_periods: int = 2  # floor the raw error by its recurrence on each of this many previous days (0: off)
    seasonal_slack: int = 2  # +- rows of phase tolerance of the seasonal floor
    seasonal_level: bool = False  # autoencoders: floor the level channel's |z| the same way

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"NAB model must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.target not in ("reconstruct", "predict", "both"):
            raise ValueError(f"target must be 'reconstruct', 'predict' or 'both', got {self.target!r}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")

    def replace(self, **changes: object) -> NabDetectorConfig:
        return dataclasses.replace(self, **changes)

    def model_config(self) -> ModelConfig | None:
        if self.kind == "gaussian":
            return None
        return ModelConfig(kind=self.kind, n_features=1, window=self.window, hidden_size=self.hidden_size,
                           latent_size=self.latent_size)


def parse_overrides(items: list[str] | None) -> dict[str, object]:
    """``["hold=200", "diff_channel=false"]`` -> typed overrides for :class:`NabDetectorConfig`."""
    fields = {f.name: f for f in dataclasses.fields(NabDetectorConfig)}
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "kind":  # kind: each of --model's, the baseline too
            raise ValueError(f"bad setting {item!r}; expected key=value with key in {sorted(set(fields) - {'kind'})}"
                             + (" (the model kind is chosen with --model)" if key == "kind" else ""))
        default = getattr(NabDetectorConfig(), key)
        low = text.strip().lower()
        if low in ("none", "null"):
            out[key] = None
        elif isinstance(default, bool):
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} expects true/false, got {text!r}")
            out[key] = low in ("true", "1", "yes")
        elif isinstance(default, int):
            out[key] = int(text)
        elif isinstance(default, float) or key == "spatial_margin":
            out[key] = float(text)
        else:
            out[key] = text.strip()
    return out


def _machine_and_code() -> str:
    """What else the raw errors depend on, for the cache's key: this module's and the models' code, torch, and the
    CPU (its maths libraries take other paths on other CPUs, and a file's errors differ in the last bits)."""
    cpu = platform.machine()
    try:  # x86: "model name"; ARM: the implementer and part
        cpu += "".join(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()[:40]
                       if ln.startswith(("model name", "CPU implementer", "CPU part")))
    except OSError:
        pass
    code = Path(sys.modules[ModelConfig.__module__].__file__).read_bytes() + Path(__file__).read_bytes()
    return f"|torch {torch.__version__}|{cpu}|{hashlib.sha1(code).hexdigest()}"


class NabStreamingDetector:
    """One causal pass over a univariate series; create a fresh one per file.

    ``raw_cache``: a directory where raw errors are stored under a hash of the series, the probation length, the
    settings in ``RAW_ERROR_FIELDS``, the code, torch and the CPU, so post-processing variants can be compared
    without retraining.
    """

    def __init__(self, cfg: NabDetectorConfig | None = None, raw_cache: str | Path | None = None) -> None:
        self.cfg = cfg or NabDetectorConfig()
        self.name = self.cfg.kind
        self.raw_cache = Path(raw_cache) if raw_cache is not None else None
        self._cache_warned = False
        self.cache_hit = False
        self.train_seconds = 0.0  # spent on fitting and fine-tuning (set by score_stream)

    def score_stream(self, values: np.ndarray, probation: int, period: int = 0) -> np.ndarray:
        """(N,) values -> (N,) scores in [0, 1]; fits on ``values[:probation]`` only. ``period``: rows per
        day (from the prefix's timestamps; 0 = unknown, no seasonal floor)."""
        x = np.asarray(values, dtype=np.float64)
        if probation < 2 or probation >= len(x):
            raise ValueError(f"probation {probation} must be in [2, {len(x) - 1}]")
        raw = self._raw_errors_cached(x, probation)  # (N,)
        return self.postprocess(x, raw, probation, period)

    def _raw_errors_cached(self, x: np.ndarray, probation: int) -> np.ndarray:
        """(N,) raw errors; an ensemble averages its members' errors (each member cached on its own)."""
        cfg = self.cfg
        if cfg.kind == "gaussian" or (cfg.ensemble == 1 and cfg.target != "both"):
            return self._member_errors_cached(cfg, x, probation)
        targets = ("reconstruct", "predict") if cfg.target == "both" else (cfg.target,)
        members = [cfg.replace(seed=cfg.seed + k, ensemble=1, target=t) for k in range(cfg.ensemble) for t in targets]
        total = np.zeros(len(x))
        seconds = 0.0
        hits = True
        for member in members:
            total += self._member_errors_cached(member, x, probation)
            seconds += self.train_seconds
            hits = hits and self.cache_hit
        self.train_seconds, self.cache_hit = seconds, hits
        return total / len(members)

    def _member_errors_cached(self, cfg: NabDetectorConfig, x: np.ndarray, probation: int) -> np.ndarray:
        self.cache_hit, self.train_seconds = False, 0.0
        if self.raw_cache is None:
            return self.raw_errors(x, probation, cfg)
        key = {f: getattr(cfg, f) for f in RAW_ERROR_FIELDS}
        key.update({f: getattr(cfg, f) for f in RAW_ERROR_FIELDS_NEW if getattr(cfg, f) != getattr(_DEFAULTS, f)})
        settings = json.dumps(key, sort_keys=True) + _machine_and_code()
        digest = hashlib.sha1(settings.encode() + x.tobytes() + str(probation).encode()).hexdigest()[:20]
        path = self.raw_cache / f"{cfg.kind}-{digest}.npy"
        if path.is_file():
            self.cache_hit = True
            return np.load(path)
        raw = self.raw_errors(x, probation, cfg)
        try:  # a cache, so best effort: one that cannot be written (a read-only copy of hits) must not lose the run
            self.raw_cache.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")  # whole or not at all (a full disk: a cut file
            try:  # loaded as a hit failed the next run)
                with open(partial, "wb") as out:
                    np.save(out, raw)
                partial.replace(path)
            finally:
                partial.unlink(missing_ok=True)  # not left on a full disk
        except OSError as exc:
            if not self._cache_warned:
                self._cache_warned = True
                logging.getLogger("anomalyd").warning("raw cache %s not written (%s): the errors are computed "
                                                      "again next time", self.raw_cache, exc)
        return raw

    # -- raw errors ---------------------------------------------------------------------------------
    def raw_errors(self, x: np.ndarray, probation: int, cfg: NabDetectorConfig | None = None) -> np.ndarray:
        """(N,) raw error per row (causal) of one model (``cfg``: defaults to the detector's settings)."""
        cfg = cfg or self.cfg
        if cfg.kind == "gaussian":
            return _windowed_gaussian(x, cfg.gauss_window, probation)
        return self._autoencoder_errors(cfg, self._scale(x, probation), probation)

    def _scale(self, x: np.ndarray, probation: int) -> np.ndarray:
        prefix = x[:probation]
        lo, hi = np.percentile(prefix, [0.5, 99.5])
        scale = max(hi - lo, float(prefix.std()), 1e-9)
        z = (x - np.median(prefix)) / scale
        return np.clip(z, -self.cfg.clip, self.cfg.clip).astype(np.float32)

    def _autoencoder_errors(self, cfg: NabDetectorConfig, z: np.ndarray, probation: int) -> np.ndarray:
        W = cfg.window
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model = build_model(cfg.model_config())
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        padded = np.concatenate([np.full(W - 1, z[0], dtype=np.float32), z])  # row i <-> window ending on i
        windows = torch.from_numpy(np.ascontiguousarray(sliding_window_view(padded, W)))[:, :, None]  # (N, W, 1)
        inputs = windows.clone()
        if cfg.target == "predict":  # the newest value is hidden (held at the previous one): a one-step forecast
            inputs[:, -1] = windows[:, -2]
        windows = torch.cat([inputs, windows], dim=2)  # (N, W, 2): model input, target
        t0 = time.perf_counter()
        model.train()
        first = W - 1  # windows made only of real rows start at row W-1
        self._train_epochs(model, opt, windows[first:probation], cfg.epochs, rng)
        self.train_seconds = time.perf_counter() - t0
        err = np.empty(len(z), dtype=np.float64)
        step = cfg.finetune_every if cfg.finetune_every > 0 else len(z)
        err[:probation] = _newest_step_error(model, windows[:probation])
        for a in range(probation, len(z), step):
            b = min(a + step, len(z))
            err[a:b] = _newest_step_error(model, windows[a:b])  # model has seen rows < a only
            if cfg.finetune_every > 0 and b < len(z):
                t0 = time.perf_counter()
                recent = windows[max(first, b - cfg.finetune_history) : b]  # windows ending before row b
                self._train_steps(model, opt, recent, cfg.finetune_steps, rng)
                self.train_seconds += time.perf_counter() - t0
        return err

    def _train_epochs(self, model, opt, windows: torch.Tensor, epochs: int, rng: np.random.Generator) -> None:
        n = len(windows)
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(n))
            for i in range(0, n, self.cfg.batch_size):
                _adam_step(model, opt, windows[order[i : i + self.cfg.batch_size]], self.cfg.last_weight)

    def _train_steps(self, model, opt, windows: torch.Tensor, steps: int, rng: np.random.Generator) -> None:
        model.train()
        for _ in range(steps):
            batch = windows[torch.from_numpy(rng.integers(0, len(windows), self.cfg.batch_size))]
            _adam_step(model, opt, batch, self.cfg.last_weight)

    # -- scores -------------------------------------------------------------------------------------
    def postprocess(self, x: np.ndarray, raw: np.ndarray, probation: int, period: int = 0) -> np.ndarray:
        """Raw errors (N,) -> scores (N,) in [0, 1]; 0 on the probationary rows."""
        cfg = self.cfg

        def floored(e: np.ndarray) -> np.ndarray:
            return seasonal_floor(e, period, cfg.seasonal_periods, cfg.seasonal_slack) if period > 0 else e

        if not cfg.postprocess:
            ref = 9.0 * float(np.median(raw[:probation])) + 1e-12  # median prefix error -> 0.1
            out = raw / (raw + ref)  # monotone squash that does not saturate (keeps the ranking)
        else:
            ae_seen = cfg.ae_seen_before if cfg.ae_seen_before >= 0 and cfg.kind != "gaussian" else cfg.seen_before
            primary = floored(raw)
            errors = [(primary, cfg.avg, ae_seen)]
            if cfg.ae_long_avg > 0 and cfg.kind != "gaussian":
                errors.append((primary, cfg.ae_long_avg, ae_seen))
            if cfg.level_channel and cfg.kind != "gaussian":
                level = _windowed_gaussian(x, cfg.gauss_window, probation)
                errors.append((floored(level) if cfg.seasonal_level else level, cfg.avg, cfg.seen_before))
            if cfg.diff_channel:
                diff = np.abs(np.diff(x, prepend=x[0]))
                lo, hi = np.percentile(x[:probation], [1, 99])
                errors.append((np.clip(diff / max(hi - lo, 1e-9), 0.0, 1.0), cfg.avg, cfg.seen_before))
            # Bonferroni: log(K p) / log(1e-10) = loglik - log(K) / log(1e10)
            shift = np.log(len(errors)) / np.log(1e10) if cfg.bonferroni else 0.0
            channels = [
                np.clip(anomaly_loglik(e, avg, cfg.history, cfg.min_std, seen) - shift, 0.0, 1.0)
                for e, avg, seen in errors
            ]
            if cfg.spatial_margin is not None:
                channels.append(spatial_novelty(x, probation, cfg.spatial_margin))
            out = np.maximum.reduce(channels)
        out[:probation] = 0.0
        if cfg.postprocess:
            out = suppress_after_alarm(out, cfg.alarm_level, cfg.hold)
        return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)

    def cost(self) -> dict[str, int]:
        mc = self.cfg.model_config()
        if mc is None:
            return {"params": 0, "macs_per_window": 0}
        c = model_cost(mc)
        return {"params": c.params, "macs_per_window": c.macs_per_window}


def _adam_step(model: torch.nn.Module, opt: torch.optim.Optimizer, pairs: torch.Tensor, last_weight: float) -> None:
    """One Adam step on (B, W, 2) pairs of (model input, target) windows."""
    opt.zero_grad(set_to_none=True)
    sq = (model(pairs[..., :1]) - pairs[..., 1:]).square()  # (B, W, 1)
    loss = sq.mean() + last_weight * sq[:, -1].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _newest_step_error(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4096) -> np.ndarray:
    """(B, W, 2) pairs of (model input, target) windows -> (B,) |x_W - x_hat_W| of each window's newest step."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            xb = windows[i : i + batch]
            out.append((model(xb[..., :1])[:, -1, 0] - xb[:, -1, 1]).abs().double().numpy())
    model.train()
    return np.concatenate(out) if out else np.empty(0)


_DEFAULTS = NabDetectorConfig()


def _windowed_gaussian(x: np.ndarray, window: int, probation: int) -> np.ndarray:
    """|x_t - mean| / std over the previous ``window`` rows (prefix statistics for the first rows)."""
    mean, std = past_mean_std(x, window, 0.0)
    p = probation
    pm, ps = float(x[:p].mean()), float(x[:p].std())
    mean[:p], std[:p] = pm, ps  # rows of the prefix: the prefix's own statistics
    floor = max(float(x[:p].std()) * 1e-3, 1e-9)
    return np.abs(x - mean) / np.maximum(std, floor)
