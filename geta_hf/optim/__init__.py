"""QASSO: GETA's partially projected optimizer (stages, importance, joint pruning/quantization).

Modules, one job each: :mod:`.schedule` (stage/period arithmetic), :mod:`.importance` (unit
scores and selection), :mod:`.joint` (the §3.5 forget-rate / quant-step math), :mod:`.layout`
(precomputed index tables), :mod:`.bits` (the quantizer scalars: projection, log-space steps,
clip calibration, frozen bits), :mod:`.pruning` (units, periods, progressive forgetting),
:mod:`.qasso` (the ``torch.optim.Optimizer`` that orchestrates them), :mod:`.state` (what a
checkpoint must match to be resumed).
"""

from .bits import BitController
from .joint import ETA, FORGET_BUDGET, SAFEGUARD, ZETA
from .pruning import PruningController
from .qasso import QASSO, VARIANTS
from .schedule import StagePlan
from .state import StateMismatchError

__all__ = ["QASSO", "VARIANTS", "StagePlan", "BitController", "PruningController", "ETA", "ZETA",
           "SAFEGUARD", "FORGET_BUDGET", "StateMismatchError"]
