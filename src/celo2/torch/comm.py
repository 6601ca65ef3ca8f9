"""What the optimizer's collectives put on the wire, for examples and benchmarks to read.

:data:`COMM` counts, in this process, the bytes and calls of the all-reduces
and all-to-alls that :class:`~celo2.torch.Celo2` makes on sharded (DTensor)
parameters; reset it before the steps to measure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CommCounter:
    """Bytes this rank put on the wire in the optimizer's collectives.

    All-reduces count ``2 (W - 1) / W`` times the tensor (a ring's share per
    rank), all-to-alls the bytes sent to other ranks.

    Attributes:
        all_reduce_bytes: Bytes of all-reduces.
        all_to_all_bytes: Bytes of all-to-alls.
        all_reduces: Number of all-reduces.
        all_to_alls: Number of all-to-alls.
        whole_bytes_peak: The most bytes of whole matrices this rank held at once for Newton-Schulz.
    """

    all_reduce_bytes: int = 0
    all_to_all_bytes: int = 0
    all_reduces: int = 0
    all_to_alls: int = 0
    whole_bytes_peak: int = 0

    def reset(self) -> None:
        """Zero every count."""
        self.all_reduce_bytes = self.all_to_all_bytes = self.all_reduces = self.all_to_alls = 0
        self.whole_bytes_peak = 0

    @property
    def total_bytes(self) -> int:
        """All bytes sent."""
        return self.all_reduce_bytes + self.all_to_all_bytes


COMM = CommCounter()
"""The running counts of this process (``benchmarks/distributed_step.py`` and ``examples/fsdp2_gpt.py``
read and reset them)."""
