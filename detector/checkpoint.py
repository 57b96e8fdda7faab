"""Checkpoints: weights in safetensors, everything else in JSON beside it. Never pickle.

A checkpoint is a directory::

    model.safetensors   tensors only (safetensors cannot carry code)
    model.json          format + version, model kind and config, scaler, threshold state, feature names,
                        scoring settings, training summary, creation time, tensor shapes, the weights file's SHA-256

Loading validates everything and raises ``CheckpointError`` naming the file and the problem.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .autoencoder import AutoencoderDetector, check_scoring_settings
from .models import ModelConfig, build_model
from .scaling import Scaler
from .thresholds import threshold_from_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "META_FILE", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "read_metadata", "sync_path"]

FORMAT = "anomalyd-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def sync_path(path: str | Path) -> None:
    """Flush ``path`` (a file, or a directory's entries: a rename in it) to the disk, so that a power loss after
    this returns cannot leave the name pointing at an empty or half-written file. A directory that cannot be
    opened for reading (write-only) or flushed (some file systems refuse it) is left as it is: the write is done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def save_checkpoint(detector: AutoencoderDetector, directory: str | Path) -> Path:
    """Write ``detector`` to ``directory`` (created). Files are written to temp names, flushed to the disk, then
    renamed one after the other (and the directory flushed), so that a crash leaves each file either old or new.
    Over an earlier checkpoint a crash between the renames leaves new weights beside old metadata: model.json
    records the weights' SHA-256, and such a pair does not load."""
    if detector.scaler is None or detector.threshold is None:
        raise ValueError("only a fitted detector (scaler and threshold) can be checkpointed")
    if not detector.threshold.fitted:  # it would load, then raise NotFittedError at every scoring call
        raise ValueError(f"the detector's {detector.threshold.kind} threshold is not fitted: call fit(scores) on it "
                         "before checkpointing")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in detector.model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": detector.model_cfg.kind,
        "model_config": detector.model_cfg.to_dict(),
        "feature_names": list(detector.feature_names),
        "score_last_k": detector.score_last_k,
        "scaler": detector.scaler.to_dict(),
        "threshold": detector.threshold.to_dict(),
        "train_summary": _json_safe(detector.summary),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    weights = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    weights_tmp, meta_tmp = directory / (WEIGHTS_FILE + ".tmp"), directory / (META_FILE + ".tmp")
    weights_tmp.write_bytes(weights)
    meta_tmp.write_text(json.dumps(meta, indent=2, allow_nan=False))
    sync_path(weights_tmp)
    sync_path(meta_tmp)
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    os.replace(meta_tmp, directory / META_FILE)
    sync_path(directory)
    return directory


def read_metadata(directory: str | Path) -> dict:
    """Parse and validate ``model.json`` of a checkpoint directory."""
    directory = Path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint metadata file")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an anomalyd checkpoint (format field is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format_version {meta.get('format_version')!r} "
            f"(this anomalyd reads version {FORMAT_VERSION})"
        )
    for key in ("model_config", "feature_names", "scaler", "threshold", "score_last_k"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return meta


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> AutoencoderDetector:
    """Rebuild a detector from the checkpoint directory alone."""
    directory = Path(directory)
    meta = read_metadata(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
        if not isinstance(meta["scaler"], dict):
            raise ValueError(f"scaler must be a dict with 'method', 'center' and 'scale', got {meta['scaler']!r:.80}")
        scaler = Scaler.from_dict(meta["scaler"])
        threshold = threshold_from_dict(meta["threshold"])
    except (TypeError, ValueError, KeyError, OverflowError) as exc:  # OverflowError: an int field of Infinity
        raise CheckpointError(f"{meta_path}: invalid metadata: {exc}") from None
    if not threshold.fitted:  # loading would succeed, then every scoring call raise: no fallback to an older one
        raise CheckpointError(f"{meta_path}: invalid metadata: the {threshold.kind} threshold is not fitted "
                              "(its state is null)")
    last_k = meta["score_last_k"]
    if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int)
                               or not 1 <= last_k <= cfg.window):
        raise CheckpointError(f"{meta_path}: invalid metadata: score_last_k must be null or an integer in "
                              f"1..{cfg.window} (the window), got {last_k!r}")
    names = meta["feature_names"]
    if not isinstance(names, list) or len(names) != cfg.n_features or scaler.n_features != cfg.n_features:
        raise CheckpointError(f"{meta_path}: feature names / scaler do not match n_features={cfg.n_features}")
    try:  # distinct non-empty strings, as a detector is built with
        check_scoring_settings(cfg, names, None)
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing weights file")
    try:
        weights = weights_path.read_bytes()
        state = load(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({exc})") from None
    if "weights_sha256" in meta and meta["weights_sha256"] != hashlib.sha256(weights).hexdigest():  # not in older ones
        raise CheckpointError(f"{weights_path}: not the weights {meta_path} was saved with (their SHA-256 differs): "
                              "the two files come from different saves (one in progress: load again; one "
                              "interrupted between its renames, or a copy of one file only)")
    with torch.device("meta"):  # shapes only: a corrupt size in the metadata must not allocate (gigabytes) first
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise CheckpointError(f"{weights_path}: tensors do not match a {cfg.kind} model "
                              f"(missing {missing}, unexpected {extra})")
    bad = [f"{k}: file {got[k]} vs model {expected[k]}" for k in expected if got[k] != expected[k]]
    if bad:
        raise CheckpointError(f"{weights_path}: wrong tensor shapes for config {cfg}: " + "; ".join(bad))
    if any(v.dtype != torch.float32 for v in state.values()):
        kinds = sorted({str(v.dtype) for v in state.values()} - {"torch.float32"})
        raise CheckpointError(f"{weights_path}: weights must be float32, found {', '.join(kinds)}")
    if any(not torch.isfinite(v).all() for v in state.values()):
        raise CheckpointError(f"{weights_path}: weights contain NaN or inf")
    model = build_model(cfg)
    model.load_state_dict(state)
    return AutoencoderDetector(
        cfg, model=model, scaler=scaler, threshold=threshold, feature_names=list(names),
        score_last_k=last_k, summary=meta.get("train_summary") or {}, device=device,
    )
