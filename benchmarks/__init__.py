"""anomalyd benchmarks (issue 5): not part of ``make test``; each module is ``python -m benchmarks.<name>``.

* ``engine``   windows/s of GRU/LSTM inference (eager PyTorch vs the fused C++ forward) against torch.mm's peak
* ``pipeline`` end to end through a real local Kafka broker, against the raw client and the engine alone
* ``latency``  event->score and event->alert latency at half of the measured capacity
* ``baseline`` speed-up over a naive deque-per-stream, one-model-call-per-event detector and river's HST
* ``gpu``      engine sweep and the scoring half of the pipeline on a CUDA device (< 5 minutes)
* ``gpu_checks`` on a CUDA device: AMP training, GPU against CPU scores and decisions, the engine's warm-up
* ``intake``   ``Daemon.process`` from memory (decode, routing, window buffers) without the model
* ``kernel_ab`` the fused kernel of a git revision against the working tree's

``device_bundle.sh`` packs Java, the broker's jars and the client wheels for a GPU machine without them, so that
``pipeline --device cuda`` runs there against a real broker; ``device_run.sh`` is one budgeted call there (the
pipeline at 1,000 and 100,000 streams, float16, latency, the Python decoder's A/B).

``engine``, ``pipeline``, ``latency``, ``baseline``, ``gpu`` and ``gpu_checks`` print a table and write JSON
(default ``~/.cache/anomalyd/bench/<name>.json``, ``--json`` to change it); ``--quick`` runs a reduced size in
about a minute. ``intake`` and ``threshold_far`` write JSON only when given ``--json``; ``kernel_ab`` and the
accuracy scripts (``alert_rule``, ``error_weighting``, ``baseline_floor``) only print. Results and their discussion:
``benchmarks/RESULTS.md``.
"""
