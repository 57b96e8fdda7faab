"""Pure modelling for anomalyd: models, windows, scaling, scoring, thresholds, training, checkpoints.

Nothing in this package imports Kafka, HTTP or Prometheus code.
"""
