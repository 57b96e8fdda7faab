"""Training: time-ordered split, Adam, gradient clipping, early stopping, threshold calibration."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .autoencoder import AutoencoderDetector, check_scoring_settings
from .base import sliding_windows
from .device import exact_float32, resolve_device
from .models import ModelConfig, build_model
from .scaling import Scaler
from .thresholds import Threshold, make_threshold

__all__ = ["TrainConfig", "train_detector", "calibrate_threshold", "enough_rows", "load_series"]

logger = logging.getLogger("anomalyd")
_DST_FALL_BACKS_APART = timedelta(days=300)  # daylight saving time ends once a year
FAR_BEYOND_SCORES = 10.0  # a fitted threshold this many times the second largest validation score is warned about


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (guards against exploding gradients)
    val_fraction: float = 0.2  # the last part of the series (time-ordered) is validation
    patience: int = 5  # early stopping: epochs without val-loss improvement
    min_delta: float = 1e-5
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # automatic mixed precision on CUDA
    scaler: str = "robust"
    score_last_k: int | None = None  # score = error over the last k steps (None: whole window)
    threshold: str = "spot"
    threshold_params: dict = field(default_factory=dict)
    train_stride: int = 1
    max_windows: int | None = 20000  # cap on training windows per epoch (evenly spaced subset)

    def to_dict(self) -> dict:
        return asdict(self)


def load_series(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Load (T, F) float32 training data from ``.npy`` or CSV (UTF-8, with or without a BOM) with a header row.

    CSV columns named ``timestamp``/``ts``/``time`` (any case) are skipped; the rest are the features, which must
    have names, each once. Empty cells are missing values (NaN); infinities and rows whose cell count differs from
    the header's are errors naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data file not found: {path}")
    if path.suffix.lower() == ".npy":
        X = np.load(path, allow_pickle=False)
        X = X.reshape(-1, 1) if X.ndim == 1 else X
        if X.ndim != 2:
            raise ValueError(f"{path}: an array of shape {X.shape}; training data is (rows, features), or (rows,)")
        try:
            with np.errstate(over="ignore"):  # beyond float32: inf, reported below
                X = X.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not numbers ({X.dtype}): {exc}") from None
        if np.isinf(X).any():
            raise ValueError(f"{path}: row {int(np.flatnonzero(np.isinf(X).any(axis=1))[0])} holds a value that is "
                             "infinite or beyond float32")
        return X, [f"f{i}" for i in range(X.shape[1])]
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's BOM is not in a name
            return _read_csv(path, csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                         "a .npy file needs the .npy suffix") from None


def _read_csv(path: Path, reader) -> tuple[np.ndarray, list[str]]:
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file (a header row of feature names, then data rows)")
    keep = [i for i, h in enumerate(header) if h.strip().lower() not in ("timestamp", "ts", "time")]
    names = [header[i].strip() for i in keep]
    if not names:
        raise ValueError(f"{path}:1: no feature columns, only a time column")
    if unnamed := [i + 1 for i in keep if not header[i].strip()]:
        raise ValueError(f"{path}:1: column {unnamed[0]} has no name (a trailing comma, or an unnamed index "
                         "column?); the first row must name every column")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"{path}:1: feature {twice[0]!r} is named twice in the header")
    numbered = [h.strip() for h in header] == [str(i) for i in range(len(header))]  # pandas' names: 0, 1, 2, ...
    if all(_is_number(h) for h in header) and not numbered:
        raise ValueError(f"{path}:1: the first row is numbers, not a header row of feature names")
    time_col = next((i for i in range(len(header)) if i not in keep), None)
    rows, lines, times = [], [], []
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} cells, the header has {len(header)}")
        try:
            rows.append([float(row[i]) if row[i].strip() else np.nan for i in keep])
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: cannot parse row {row!r}: {exc}") from None
        lines.append(lineno)
        if time_col is not None:
            times.append(row[time_col].strip())
    if not rows:
        raise ValueError(f"{path}: no data rows")
    _check_time_order(path, header[time_col] if time_col is not None else "", times, lines)
    with np.errstate(over="ignore"):  # beyond float32: inf, reported below
        X = np.asarray(rows, dtype=np.float32)
    if np.isinf(X).any():  # inf, or beyond float32
        lineno = lines[int(np.flatnonzero(np.isinf(X).any(axis=1))[0])]
        raise ValueError(f"{path}:{lineno}: a value that is infinite or beyond float32 (leave a missing value's cell "
                         "empty)")
    return X, names


def _check_time_order(path: Path, column: str, times: list[str], lines: list[int]) -> None:
    """Refuse rows out of time order (a newest-first export trained on time run backwards and calibrated on the
    oldest rows): the time column read as numbers, else as ISO 8601 times; one it cannot read so is not checked.
    Times without a UTC offset (local time) may step back once by up to an hour where daylight saving time ends and
    the hour repeats: a step whose neighbours do not step back, 300 days or more after any other (they come once
    a year; warned about)."""
    if len(times) < 2:
        return
    try:
        keys: list = [float(t) for t in times]
    except ValueError:
        try:
            keys = [datetime.fromisoformat(t) for t in times]
        except ValueError:
            return
    try:
        back = [i for i in range(1, len(keys)) if keys[i] < keys[i - 1]]
    except TypeError:  # times with and without a zone
        return
    local = isinstance(keys[0], datetime) and keys[0].tzinfo is None  # all of them, or comparing them had raised
    for n, i in enumerate(back):
        if not (local and keys[i - 1] - keys[i] <= timedelta(hours=1) and i + 1 not in back[n + 1 : n + 2]
                and (n == 0 or keys[i] - keys[back[n - 1]] >= _DST_FALL_BACKS_APART)):  # not a DST fall-back
            hint = (" (times in local time without a UTC offset should carry their offset or be in UTC: sorting "
                    "interleaves the hour repeated when daylight saving time ends)") if local else ""
            raise ValueError(f"{path}:{lines[i]}: {column.strip()} {times[i]} is earlier than the row before "
                             f"(line {lines[i - 1]}, {times[i - 1]}): training reads rows in order; sort the file "
                             f"by its time column, oldest first{hint}")
    for i in back:
        logger.warning("%s:%d: %s %s is earlier than the row before (line %d, %s): taken as the hour repeated when "
                       "daylight saving time ends; times with a UTC offset, or in UTC, leave no doubt",
                       path, lines[i], column.strip(), times[i], lines[i - 1], times[i - 1])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _n_val(rows: int, window: int, val_fraction: float) -> int:
    """Validation rows at the end of a series of ``rows``: a fraction, but at least W + 20 (20 windows)."""
    return max(int(rows * val_fraction), window + 20)


def enough_rows(rows: int, window: int, val_fraction: float = 0.2) -> bool:
    """Whether a series of ``rows`` leaves W + 1 training rows beside its validation part."""
    return rows - _n_val(rows, window, val_fraction) >= window + 1


def _fill_missing(X: np.ndarray) -> np.ndarray:
    """(T, F) copy with NaNs filled per feature: the last valid value carried forward; leading NaNs take the
    column's first valid value (never anything later, so validation rows do not leak into training rows);
    an all-NaN column stays NaN (:func:`train_detector` fills it with the scaler's centre, as the daemon fills a
    feature a stream has not reported).  Arrays that are not 2-D are returned as float32 copies, unfilled."""
    X = np.array(X, dtype=np.float32)
    mask = np.isnan(X)
    if X.ndim != 2 or not mask.any():
        return X
    valid = ~mask
    rows = np.arange(X.shape[0])[:, None]  # (T, 1)
    idx = np.where(valid, rows, -1)  # (T, F) row of each valid value, -1 at NaNs
    np.maximum.accumulate(idx, axis=0, out=idx)  # row of the last valid value at or before each row
    idx = np.where(idx < 0, np.argmax(valid, axis=0)[None, :], idx)  # leading NaNs: first valid row (0 if none)
    return X[idx, np.arange(X.shape[1])]  # an all-NaN column: its row 0, NaN


def _subsample(windows: np.ndarray, cap: int | None) -> np.ndarray:
    if cap is None or len(windows) <= cap:
        return windows
    return windows[np.linspace(0, len(windows) - 1, cap).astype(np.int64)]


def _finite_windows(windows: torch.Tensor, what: str, say: Callable[[str], None]) -> torch.Tensor:
    """(N, W, F) scaled windows without those holding a value beyond float32 (a reading far outside the scaler's
    range): one such window in a batch made every gradient NaN, and the model with it."""
    finite = torch.isfinite(windows).flatten(1).all(1)
    if bool(finite.all()):
        return windows
    say(f"left out {int((~finite).sum())} of {len(windows)} {what} windows with values beyond float32 after "
        "scaling; leave such readings out of the training data")
    if not bool(finite.any()):
        raise ValueError(f"every {what} window has values beyond float32 after scaling")
    return windows[finite]


def calibrate_threshold(scores: np.ndarray, kind: str, params: dict, log: Callable[[str], None]) -> Threshold:
    """Fit the configured threshold on validation scores. Too little data for it: DSPOT (which needs ``depth``
    scores more) gives way to SPOT of the same parameters, and a tail fit to the quantile of the same risk
    (1 - risk, at least 0.5), which is further from the risk on few scores. Parameters the threshold refuses
    raise: that is no lack of data. Scores without any spread are said: the threshold is then just above them."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) and np.isfinite(scores).all() and scores.min() == scores.max():
        log(f"warning: every validation window scores {scores[0]:.6g}, so any change will be over the threshold; "
            "train on data in which the stream varies as it does in normal operation")
    threshold = make_threshold(kind, **params)
    try:
        threshold.fit(scores)
    except (ValueError, OverflowError) as exc:  # OverflowError: a tail fit on excesses spanning many decades
        if kind == "quantile":
            raise
        if kind == "dspot":
            try:
                spot = make_threshold("spot", **{k: v for k, v in params.items() if k != "depth"}).fit(scores)
            except (ValueError, OverflowError):
                pass
            else:
                log(f"threshold 'dspot' could not be fitted ({exc}); using 'spot' with the same risk instead")
                return spot
        q = min(max(1.0 - float(params["risk"]), 0.5), 0.9999) if "risk" in params else 0.99
        log(f"threshold {kind!r} could not be fitted ({exc}); using a {q:g} quantile threshold instead")
        return make_threshold("quantile", q=q).fit(scores)
    top = float(np.partition(scores, -2)[-2]) if len(scores) >= 2 else 0.0  # the largest but one: not an outlier
    if top > 0 and threshold.threshold > FAR_BEYOND_SCORES * top:
        log(f"warning: the threshold ({threshold.threshold:.6g}) is {threshold.threshold / top:.3g} times the second "
            f"largest validation score ({top:.6g}): the tail fit extrapolated far beyond the data (few validation "
            "windows, an outlier among them?), and only windows scoring like that will alarm; train on more data "
            "without the outlier, or use --threshold quantile")
    return threshold


def train_detector(
    X: np.ndarray | list[np.ndarray],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig | None = None,
    feature_names: list[str] | None = None,
    log: Callable[[str], None] | None = print,
) -> AutoencoderDetector:
    """Train on (T, F) normal data, or a list of such series (one per stream); calibrate the threshold."""
    cfg = train_cfg or TrainConfig()
    check_scoring_settings(model_cfg, feature_names or None, cfg.score_last_k)  # before training, not after it
    say = log or (lambda _msg: None)
    series = X if isinstance(X, list | tuple) else [X]  # several streams: windows never cross streams
    W = model_cfg.window
    train_parts, val_parts = [], []
    unreported = np.zeros(model_cfg.n_features, dtype=bool)  # (F,) features with no value in a training part
    for x in series:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != model_cfg.n_features:
            raise ValueError(f"training data must be (T, {model_cfg.n_features}), got {x.shape}")
        n_val = _n_val(len(x), W, cfg.val_fraction)
        if not enough_rows(len(x), W, cfg.val_fraction):
            raise ValueError(f"need at least {W + 1 + n_val} rows to train with window {W}, got {len(x)}")
        # filled after the split, the validation part carrying the training part's last values forward: a
        # feature that first reports in the validation part must not lend that value to training rows
        unreported |= np.isnan(x[:-n_val]).all(axis=0)
        train = _fill_missing(x[:-n_val])
        train_parts.append(train)
        val_parts.append(_fill_missing(np.concatenate([train[-1:], x[-n_val:]]))[1:])
    train_rows = np.concatenate(train_parts)
    if unreported.any():  # the model learns a constant there, which the feature may never have
        names = feature_names or [f"f{j}" for j in range(model_cfg.n_features)]
        say(f"warning: no values in the training part of a series for {', '.join(np.asarray(names)[unreported])}: "
            "filled with the scaler's centre (of the other series' values; 0 when none has any), as the daemon fills "
            "a feature a stream has not reported")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    scaler = Scaler(cfg.scaler).fit(train_rows, missing_ok=True,  # a feature one series lacks: fitted on the others
                                    names=feature_names)
    # the daemon's fill for a feature a stream never reported: the scaler's centre (0 had made the validation
    # windows of such a series score far over the rest, and raised the pooled threshold for every stream)
    train_parts = [np.where(np.isnan(x), scaler.center, x) for x in train_parts]
    val_parts = [np.where(np.isnan(x), scaler.center, x) for x in val_parts]
    train_w = torch.from_numpy(np.ascontiguousarray(_subsample(np.concatenate(
        [sliding_windows(scaler.transform(x), W, cfg.train_stride) for x in train_parts]), cfg.max_windows)))
    val_windows = np.concatenate([sliding_windows(x, W) for x in val_parts])  # raw units, (N, W, F)
    val_w = torch.from_numpy(np.ascontiguousarray(_subsample(scaler.transform(val_windows), cfg.max_windows)))
    train_w, val_w = _finite_windows(train_w, "training", say), _finite_windows(val_w, "validation", say)
    model = build_model(model_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    grad_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = nn.MSELoss()

    def val_loss() -> float:
        model.eval()
        total = 0.0
        with torch.inference_mode():
            for i in range(0, len(val_w), 1024):
                xb = val_w[i : i + 1024].to(device)
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    total += loss_fn(model(xb).float(), xb).item() * len(xb)
        return total / max(len(val_w), 1)

    best, best_state, bad, history = float("inf"), None, 0, []
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.from_numpy(rng.permutation(len(train_w)))
        running, counted, skipped = 0.0, 0, 0
        for i in range(0, len(order), cfg.batch_size):
            xb = train_w[order[i : i + cfg.batch_size]].to(device)  # (B, W, F)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                out = model(xb).float()
            loss, n = loss_fn(out, xb), len(xb)
            if not bool(torch.isfinite(loss)):  # a reading too large to square in float32 makes the loss inf and the
                per_window = (out - xb).square().mean(dim=(1, 2))  # clipped step zero: train on the other windows
                finite = torch.isfinite(per_window)
                skipped += int((~finite).sum())
                if not bool(finite.any()):
                    continue
                loss, n = per_window[finite].mean(), int(finite.sum())
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_scaler.step(opt)
            grad_scaler.update()
            running += loss.item() * n
            counted += n
        train_loss = running / counted if counted else float("inf")
        if skipped:
            say(f"left out {skipped} training windows whose error is not finite in float32 (the largest |value| "
                f"after scaling: {float(train_w.abs().max()):.3g}); leave such readings out of the training data")
        vl = val_loss()
        history.append({"epoch": epoch, "loss": train_loss, "val_loss": vl, "seconds": time.perf_counter() - t0})
        say(f"epoch {epoch:3d}/{cfg.epochs}  loss {train_loss:.5f}  val_loss {vl:.5f}  "
            f"time {time.perf_counter() - t0:.2f}s")
        if vl < best - cfg.min_delta:
            best, bad = vl, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                say(f"early stopping: no val_loss improvement for {cfg.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    train_seconds = time.perf_counter() - t_start

    detector = AutoencoderDetector(
        model_cfg, cfg, model=model, scaler=scaler, feature_names=feature_names,
        score_last_k=cfg.score_last_k, device=device,
    )
    with exact_float32(device):  # the threshold is calibrated on float32 scores, whatever scores them later
        val_scores = detector.score_windows(val_windows).score
    if not np.isfinite(val_scores).all():
        bad_rows = np.abs(np.concatenate(val_parts)).max(axis=0)
        raise ValueError(f"{int((~np.isfinite(val_scores)).sum())} of {len(val_scores)} validation windows score "
                         f"beyond float32 (the largest |value| per feature: "
                         f"{', '.join(f'{v:.3g}' for v in bad_rows)}); leave such readings out of the training data")
    detector.threshold = calibrate_threshold(val_scores, cfg.threshold, cfg.threshold_params, say)
    detector.summary = {
        "epochs_run": len(history),
        "best_val_loss": best,
        "train_seconds": train_seconds,
        "n_train_rows": len(train_rows),
        "n_val_rows": sum(len(v) for v in val_parts),
        "n_series": len(series),
        "n_train_windows": len(train_w),
        "device": str(device),
        "threshold": detector.threshold.threshold,
        "history": history,
        "train_config": cfg.to_dict(),
    }
    say(f"trained {model_cfg.kind} in {train_seconds:.1f}s; threshold {detector.threshold.threshold:.5g} "
        f"({detector.threshold.kind})")  # the kind fitted: calibrate_threshold may have fallen back
    return detector
