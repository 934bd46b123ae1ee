"""Crash-safe resumption: find the newest *complete* Trainer checkpoint.

`transformers.Trainer` writes ``checkpoint-N`` in place (model, optimizer, scheduler, RNG
state) and writes ``trainer_state.json`` last; it deletes older checkpoints only after that. A
save that is killed midway therefore leaves the previous checkpoint intact, but it also leaves a
newer, partial ``checkpoint-N`` that ``get_last_checkpoint`` would pick. ``GETATrainer`` resumes
through :func:`last_complete_checkpoint` instead, which skips such folders (with a warning), and
refuses an explicitly given incomplete one with :func:`check_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

__all__ = ["check_checkpoint", "last_complete_checkpoint", "IncompleteCheckpointError"]

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


class IncompleteCheckpointError(ValueError):
    """A Trainer checkpoint folder that an interrupted save left incomplete."""


def check_checkpoint(path: str) -> None:
    """Raise :class:`IncompleteCheckpointError` unless ``path`` is a complete Trainer checkpoint.

    Complete means: the folder exists, holds model weights, and its ``trainer_state.json`` (the
    file the Trainer writes last) parses and records the step in the folder's name.
    """
    if not os.path.isdir(path):
        raise IncompleteCheckpointError(f"resume_from_checkpoint={path!r}: no such folder")
    state_file = os.path.join(path, _STATE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"checkpoint {path!r} has no {_STATE}: its save was interrupted; resume from an "
            "earlier checkpoint (resume_from_checkpoint=True picks the newest complete one)") from None
    except (OSError, ValueError) as e:
        raise IncompleteCheckpointError(
            f"checkpoint {path!r}: {_STATE} is unreadable ({e}); its save was interrupted") from None
    m = _CKPT.match(os.path.basename(os.path.normpath(path)))
    step = state.get("global_step") if isinstance(state, dict) else None
    if m is not None and step != int(m.group(1)):
        raise IncompleteCheckpointError(
            f"checkpoint {path!r}: {_STATE} records global_step={step!r}, not {m.group(1)}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHTS):
        raise IncompleteCheckpointError(f"checkpoint {path!r} holds no model weights "
                                        f"(expected one of {', '.join(_WEIGHTS)})")


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete ``checkpoint-N`` under ``output_dir`` (None if there is none).

    Incomplete folders newer than it are skipped with a warning naming them and the reason; they
    are left on disk untouched.
    """
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m is not None and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), name))
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        try:
            check_checkpoint(path)
        except IncompleteCheckpointError as e:
            logger.warning("GETATrainer: skipping %s", e)
            continue
        return path
    return None
