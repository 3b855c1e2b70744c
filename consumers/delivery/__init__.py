"""Delivery: publish each poll batch's outputs in partition order, then commit its input offsets.

State apart from I/O (as aiokafka keeps its ``message_accumulator`` apart from its ``sender``), each part small
enough to check by reading it:

- ``state``: ``OffsetTracker`` (no I/O): the poll batches taken from one partition, which are done
  (outputs durable) or failed, and the offset that may be committed: one past the longest done prefix.
  It is never destructive: asking what may be committed changes nothing, so a failed commit is retried
  with the same offset, and a failed batch stops the prefix for good (the failure latch).
- ``at_least_once``, ``exactly_once``: the two protocols (``AtLeastOnce``, ``ExactlyOnce``), each with its steps
  in its docstring; ``protocol`` what they share (admission, publish turns, settle, revoke, close).
- ``state.Partition``: the lifecycle every protocol checks before producing anything for a partition:

      STARTING ──► ASSIGNED ──► REVOKING ──► REVOKED
          └─(revoked while starting)─┘  │          ▲
                       ASSIGNED/REVOKING └──► FAILED ┘   (a failed publish or transaction; latched)

  Every move goes through ``Partition.move``, which refuses any other (``_TRANSITIONS``).

  Only ASSIGNED and REVOKING partitions produce. REVOKED is final for this worker instance: a handler that
  outlives its partition's revoke deadline is cancelled and, should it still reach ``publish``, is refused.

Batches of one partition publish strictly in the order they were polled (a chain of "turns"), so the
outputs of one key keep the input order. The worker calls ``admit`` when it polls records, ``publish``
when their outputs are ready, and ``settle`` in its ``finally``; everything else happens here.
"""

from consumers.delivery.at_least_once import AtLeastOnce
from consumers.delivery.exactly_once import ExactlyOnce
from consumers.delivery.state import Batch, IllegalTransition, Lifecycle, OffsetTracker, Output, Partition
from pipeline.errors import DeliveryFailed, PartitionClosed

__all__ = ["AtLeastOnce", "Batch", "DeliveryFailed", "ExactlyOnce", "IllegalTransition", "Lifecycle", "OffsetTracker",
           "Output", "Partition", "PartitionClosed"]
