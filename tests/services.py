"""Real-service fixtures (Kafka, Redis) — filled in by the streaming core."""
