"""`GETATrainingArguments`: `TrainingArguments` plus every GETA knob, exposed to `HfArgumentParser`."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union, get_type_hints

from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from ..config import IMPORTANCE_CRITERIA, GETAConfig, StageLength
from .distill import check_distillation_temperature, check_distillation_weight

__all__ = ["GETATrainingArguments"]


def _stage(value: float, name: str):
    """A float <= 1 is a fraction of the run; a whole number > 1 is an absolute step count."""
    if not math.isfinite(value):
        raise ValueError(f"GETATrainingArguments: --{name}={value!r} is invalid; allowed: a "
                         "fraction in [0, 1] or a whole number of steps > 1")
    if value > 1:
        if value != int(value):
            raise ValueError(f"GETATrainingArguments.{name}: got {value!r}; allowed: a fraction in "
                             "[0, 1] or a whole number of steps > 1")
        return int(value)
    return float(value)


def _weights(spec: Optional[str]) -> dict:
    if spec is None:
        return {k: 0.2 for k in IMPORTANCE_CRITERIA}
    out = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError("GETATrainingArguments.geta_importance_weights: expected "
                             f"'name=weight,...' with names among {list(IMPORTANCE_CRITERIA)}; got {spec!r}")
        key = key.strip()
        if key in out:
            raise ValueError(f"GETATrainingArguments.geta_importance_weights: {key!r} is given "
                             f"twice in {spec!r}; allowed: each criterion once")
        try:
            out[key] = float(val)
        except ValueError as e:
            raise ValueError(f"GETATrainingArguments.geta_importance_weights: {val!r} is not a number") from e
    return out


# ---------------------------------------------------------------------------- generated flags
#: command-line type of a GETAConfig annotation that argparse cannot take as it is
_CLI_TYPES = {
    Sequence[int]: List[int],
    Optional[Sequence[int]]: Optional[List[int]],
    Sequence[str]: Optional[List[str]],
    Optional[Sequence[str]]: Optional[List[str]],
    StageLength: float,
    dict: Optional[str],
}


def _to_config_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """A ``--geta_<field>`` value as the GETAConfig field ``f`` takes it."""
    if hint == StageLength:
        return _stage(value, f"geta_{f.name}")
    if hint == dict:
        return _weights(value)
    if hint == Sequence[int]:
        return None if value is None else tuple(value)
    if hint == Optional[Sequence[int]]:
        return tuple(value) if value else None
    if hint == Sequence[str]:
        return tuple(value or ())
    if hint == Optional[Sequence[str]]:
        return tuple(value) if value else None
    return value


def _cli_field(f: dataclasses.Field, hint: Any) -> Tuple[str, Any, dataclasses.Field]:
    """``(name, type, field)`` of the ``--geta_<name>`` flag of GETAConfig field ``f``."""
    cli_type = _CLI_TYPES.get(hint, hint)
    meta = dict(f.metadata)
    if "choices" in meta:
        meta["choices"] = list(meta["choices"])
    if hint == dict:
        return f"geta_{f.name}", cli_type, field(default=None, metadata=meta)
    default = f.default
    if isinstance(default, (tuple, list)):
        items = list(default)
        return f"geta_{f.name}", cli_type, field(default_factory=lambda: list(items),
                                                 metadata=meta)
    return f"geta_{f.name}", cli_type, field(default=default, metadata=meta)


_HINTS = get_type_hints(GETAConfig)
#: (GETAConfig field, its resolved annotation), in declaration order
_CONFIG_FIELDS = [(f, _HINTS[f.name]) for f in dataclasses.fields(GETAConfig)]


def _flag(default: Any, help_text: str, **extra: Any) -> dataclasses.Field:
    """A trainer-side flag: its default and ``--help`` text (plus e.g. ``choices``)."""
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class _GETATrainerArguments(TrainingArguments):
    """The trainer-side GETA flags (not GETAConfig fields)."""

    geta_restart_compression_on_resume: bool = _flag(
        False, "Resuming from a checkpoint without optimizer state (e.g. save_only_model=True) "
        "is refused, because GETA's compression state is lost; with this flag the compression "
        "restarts from the checkpoint's weights over the remaining steps instead.")
    geta_optimizer: str = _flag("adamw", "Dense update of QASSO: 'adamw', 'adam' or 'sgd'.",
                                choices=["adamw", "adam", "sgd"])
    geta_tune_cpu_allocator: bool = _flag(
        True, "On Linux/CPU, keep freed tensors in the glibc heap (avoids page-fault storms).")
    geta_distillation_weight: float = _flag(
        0.5, "Knowledge distillation: weight w in [0, 1] of the KD term, loss = (1 - w) * task "
        "loss + w * KD. Used only when the trainer gets a teacher_model.")
    geta_distillation_temperature: float = _flag(
        2.0, "Knowledge distillation: softmax temperature T > 0 of the logit KD term (scaled by "
        "T^2). Used only when the trainer gets a teacher_model.")
    # the Trainer's default ("every_save") would push fake-quantized checkpoints over the
    # compressed model; GETATrainer refuses any other value with push_to_hub
    hub_strategy: Union[HubStrategy, str] = _flag(
        "end", "With --push_to_hub: only 'end' (the default here): the Hub gets the compressed "
        "model once, from push_to_hub(), never the fake-quantized training checkpoints.")

def _post_init(self) -> None:
    TrainingArguments.__post_init__(self)
    # fail at parse time, naming the command-line flag, not later inside GETATrainer
    try:
        self.to_geta_config()
    except ValueError as e:
        msg = re.sub(r"GETAConfig\.(\w+)", r"--geta_\1 (GETAConfig.\1)", str(e))
        raise ValueError(msg) from None
    # KD is a trainer concern, not a GETAConfig field: checked here, naming the flag
    check_distillation_weight(self.geta_distillation_weight,
                              "GETATrainingArguments: --geta_distillation_weight")
    check_distillation_temperature(self.geta_distillation_temperature,
                                   "GETATrainingArguments: --geta_distillation_temperature")


def _to_geta_config(self) -> GETAConfig:
    """The :class:`GETAConfig` these arguments describe (validated)."""
    return GETAConfig(**{f.name: _to_config_value(f, hint, getattr(self, f"geta_{f.name}"))
                         for f, hint in _CONFIG_FIELDS})


GETATrainingArguments = dataclasses.make_dataclass(
    "GETATrainingArguments", [_cli_field(f, hint) for f, hint in _CONFIG_FIELDS],
    bases=(_GETATrainerArguments,),
    namespace={"__module__": __name__, "__post_init__": _post_init,
               "to_geta_config": _to_geta_config, "__doc__": """\
`transformers.TrainingArguments` with GETA's settings (all prefixed ``geta_``).

Every :class:`geta_hf.GETAConfig` field ``<name>`` is a ``geta_<name>`` field here, generated
from the config's fields (defaults and help text are defined once, in ``GETAConfig``), plus the
trainer-side flags (optimizer, resume policy, distillation). Every field appears on the command
line through `HfArgumentParser` (e.g. ``--geta_target_group_sparsity 0.4 --geta_weight_bits 4
8``); :meth:`to_geta_config` turns them into a validated :class:`geta_hf.GETAConfig`.
"""})
