"""CUDA graphs of an autoencoder's whole scoring step (scaling, forward, reconstruction error), one per batch size.

Eager scoring on a GPU issues a few dozen kernel launches per chunk of windows (the scaling, cuDNN's encoder and
decoder, the linear layers, the error), and PyTorch's Python bindings release and re-take the GIL around each one.
In the daemon a second thread (polling and decoding) holds the GIL most of the time, so each hand-over can wait,
and the two threads slow each other down (benchmarks/RESULTS.md, GPU section). A graph replays the whole step as
one launch: a chunk costs one copy in, one replay, two copies out and one wait.

:class:`GraphedScorer` captures one graph per bucket (powers of two from :data:`MIN_BUCKET` to the engine's
largest batch) into one shared memory pool, and pads a chunk up to the smallest bucket that holds it. Windows are
scored independently of each other, so the padding rows (whatever an earlier chunk left there) change no real
window's score. Replays of one scorer are serialised by a lock: they share the pool, the static input and the
pinned host buffers.

``ANOMALYD_CUDA_GRAPHS``: ``0``/``off`` scores eagerly; ``1``/``on`` requires graphs (a capture error is raised);
unset/``auto`` uses them on a CUDA device and falls back to eager scoring, with a warning, when a capture fails.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from .fastpath import env_mode
from .scoring import WindowScores

__all__ = ["GraphedScorer", "MIN_BUCKET", "bucket_sizes", "bucket_for", "graphs_mode"]

log = logging.getLogger(__name__)

MIN_BUCKET = 64
"""The smallest captured batch: smaller chunks are padded to it (a replay costs the same below a few hundred)."""


def graphs_mode() -> str:
    """``auto`` | ``on`` | ``off`` from ``ANOMALYD_CUDA_GRAPHS``."""
    return env_mode("ANOMALYD_CUDA_GRAPHS")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Captured batch sizes: powers of two from :data:`MIN_BUCKET`, then ``max_batch`` itself (the largest chunk
    the engine hands over), so no chunk is padded to more than twice its size (except below the smallest)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, b = [], MIN_BUCKET
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` windows; ValueError above the largest."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} windows exceed the largest captured batch ({buckets[-1]})")


class GraphedScorer:
    """``GraphedScorer(detector, max_batch, precision)`` captures the graphs now (call it on the scoring device,
    after a warm-up forward); ``score_windows(windows)`` then scores like ``detector.score_windows``.

    ``detector`` is an ``AutoencoderDetector`` already on a CUDA device, with a fitted scaler.
    """

    def __init__(self, detector, max_batch: int, precision: str = "float32") -> None:
        device = detector.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the detector is on {device}")
        self.detector, self.precision, self.device = detector, precision, device
        self.buckets = bucket_sizes(max_batch)
        w, f = detector.window, detector.n_features
        big = self.buckets[-1]
        self._in = torch.zeros((big, w, f), device=device)  # (Bmax, W, F) static input of every graph
        self._host_in = torch.zeros((big, w, f), pin_memory=True)  # pinned staging for the copy in
        self._host_score = torch.zeros(big, pin_memory=True)  # (Bmax,)
        self._host_contrib = torch.zeros((big, f), pin_memory=True)  # (Bmax, F)
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # A graph reads its inputs by address and holds no reference to them: keep the scaling tensors, weights
        # and buffers it captures alive, so a later ``detector.to(...)`` (which drops the scaling tensors) or
        # a model reload cannot free memory the graph still reads.
        self._captured = (detector.scaling_tensors(), [t.detach() for t in detector.model.parameters()],
                          [t.detach() for t in detector.model.buffers()])
        self._capture_all()

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured computation on the first ``b`` rows of the static input: (score (b,), contrib (b, F))."""
        return self.detector.score_tensor(self._in[:b], self.precision, autocast_cache=False)

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # one pool: only one graph of this scorer runs at a time
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for b in reversed(self.buckets):  # largest first: the smaller ones then fit in its freed blocks
                for _ in range(2):  # warm-up on the side stream, as the capture will run (cuDNN plans, workspaces)
                    self._step(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    score, contrib = self._step(b)
                self._graphs[b] = (graph, score, contrib)
        torch.cuda.current_stream(self.device).wait_stream(side)
        side.synchronize()

    def score_windows(self, windows: np.ndarray) -> WindowScores:
        """(B, W, F) raw windows -> WindowScores, in chunks of at most the largest bucket."""
        det = self.detector
        windows = det.checked_windows(windows)
        n, big = len(windows), self.buckets[-1]
        score = np.empty(n, dtype=np.float64)
        contrib = np.empty((n, det.n_features), dtype=np.float32)
        for start in range(0, n, big):
            stop = min(start + big, n)
            self._score_chunk(windows[start:stop], score[start:stop], contrib[start:stop])
        return WindowScores(score=score, contributions=contrib)

    def _score_chunk(self, chunk: np.ndarray, score_out: np.ndarray, contrib_out: np.ndarray) -> None:
        n = len(chunk)
        graph, score, contrib = self._graphs[bucket_for(n, self.buckets)]
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            self._host_in[:n].numpy()[...] = chunk  # numpy copies without the GIL
            self._in[:n].copy_(self._host_in[:n], non_blocking=True)
            graph.replay()
            self._host_score[:n].copy_(score[:n], non_blocking=True)
            self._host_contrib[:n].copy_(contrib[:n], non_blocking=True)
            stream.synchronize()  # the wait releases the GIL
            score_out[...] = self._host_score[:n].numpy()
            contrib_out[...] = self._host_contrib[:n].numpy()
