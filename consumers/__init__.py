"""Long-running Kafka workers: the classify worker, the multi-process runner."""
