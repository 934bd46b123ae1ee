"""QASSO: GETA's partially projected optimizer (stages, importance, joint pruning/quantization).

Modules, one job each: :mod:`.schedule` (stage/period arithmetic), :mod:`.importance` (unit
scores and selection), :mod:`.joint` (the §3.5 forget-rate / quant-step math), :mod:`.layout`
(precomputed index tables), :mod:`.qasso` (the ``torch.optim.Optimizer``).
"""

from .joint import ETA, SAFEGUARD, ZETA
from .qasso import QASSO, VARIANTS
from .schedule import StagePlan

__all__ = ["QASSO", "VARIANTS", "StagePlan", "ETA", "ZETA", "SAFEGUARD"]
