"""Benchmarks and baselines, apart from the serving path (nothing in ``pipeline`` or ``consumers`` imports them).

- ``harness``: one load-test step (a worker process, an open-loop producer, the label topic read back), its
  analysis (latency, goodput, CPU per event), the knee and the plots; the fault scenarios use it too.
- ``ladder``: ``streamlabel bench`` (the ladder of steps, its refinement, the baselines at the same rates).
- ``engine``: the engine and plain ONNX Runtime (the ceiling) without Kafka, on any provider.
- ``generator``, ``generator_check``: the generator's closed-loop capacity and its bench through Kafka.
- ``compare``: ``streamlabel model compare``, speed against quality for several artifacts.
- ``naive``, ``handwritten``, ``naive_generate``: the consumers people write by hand, measured beside ours.
"""
