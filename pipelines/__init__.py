"""Everything that touches the world: config, Kafka, sinks, metrics, the daemon loop, evaluation, CLI."""
