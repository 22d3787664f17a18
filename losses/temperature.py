"""The softmax temperature schedule shared by the stage-1 and stage-2 losses."""
from __future__ import annotations


def temperature_at(epoch: int, base: float, maximum: float) -> float:
    """Softmax temperature ``min(base + epoch, maximum)``; ``epoch`` as the original trainer
    passes it (1 in the first epoch)."""
    return float(min(base + epoch, maximum))
