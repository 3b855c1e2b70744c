"""Synthetic and replay load generators, the load-test harness, and local service helpers."""
