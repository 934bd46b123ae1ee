"""Crash-safe resumption: find the newest *complete* Trainer checkpoint.

`transformers.Trainer` writes ``checkpoint-N`` in place (model, optimizer, scheduler, RNG
state) and writes ``trainer_state.json`` last; it deletes older checkpoints only after that. A
save that is killed midway therefore leaves the previous checkpoint intact, but it also leaves a
newer, partial ``checkpoint-N`` that ``get_last_checkpoint`` would pick. ``GETATrainer`` resumes
through :func:`last_complete_checkpoint` instead, which skips such folders (with a warning), and
refuses an explicitly given incomplete one with :func:`check_checkpoint`.

A complete checkpoint is resumed only if it can continue *this* run
(:func:`check_resume_state`): it must hold the optimizer state (QASSO's progress: step, pruned
units, frozen bits) and that state must have been written with the same GETA settings and on
the same search space. A checkpoint saved without optimizer state (``save_only_model=True``) is
refused, unless the user asks to restart the compression from its weights
(``--geta_restart_compression_on_resume``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional

__all__ = ["check_checkpoint", "last_complete_checkpoint", "IncompleteCheckpointError",
           "ResumeStateError", "check_resume_state", "checkpoint_step"]

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


class IncompleteCheckpointError(ValueError):
    """A Trainer checkpoint folder that an interrupted save left incomplete."""


class ResumeStateError(ValueError):
    """A checkpoint whose GETA state cannot continue this run: missing, or written with other
    ``--geta_*`` settings or on another search space. ``fields`` names what differs."""

    def __init__(self, message: str, fields=()) -> None:
        super().__init__(message)
        self.fields = list(fields)


#: files the Trainer writes for the optimizer and LR scheduler (both needed to resume them)
_OPTIMIZER, _SCHEDULER = "optimizer.pt", "scheduler.pt"


def checkpoint_step(path: str) -> int:
    """The ``global_step`` recorded in a complete checkpoint's ``trainer_state.json``."""
    with open(os.path.join(path, _STATE), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def check_resume_state(path: str, cfg, space, restart: bool = False) -> bool:
    """Check that checkpoint ``path`` can continue the run described by ``cfg`` and ``space``.

    ``cfg`` is the run's :class:`geta_hf.GETAConfig`, ``space`` its search space
    (:func:`geta_hf.optim.state.search_space`). Returns ``True`` when the checkpoint's QASSO
    state will be resumed; ``False`` when it has no optimizer state and ``restart`` is set (the
    compression then restarts from the checkpoint's weights). Raises :class:`ResumeStateError`
    naming the missing files, or every ``--geta_*`` flag that differs, or the search-space
    difference.
    """
    import torch

    from ..optim.state import StateMismatchError, check_state

    missing = [n for n in (_OPTIMIZER, _SCHEDULER) if not os.path.isfile(os.path.join(path, n))]
    if missing:
        if restart:
            return False
        raise ResumeStateError(
            f"GETATrainer: checkpoint {path!r} holds no optimizer state ({' and '.join(missing)} "
            "missing, e.g. saved with save_only_model=True), so GETA's compression state (step, "
            "pruned units, bit bounds) is lost and resuming would silently restart it; resume "
            "from a checkpoint saved with its optimizer state, or pass "
            "--geta_restart_compression_on_resume to restart the compression from this "
            "checkpoint's weights over the remaining steps", ["optimizer_state"])
    try:
        sd = torch.load(os.path.join(path, _OPTIMIZER), map_location="cpu", weights_only=True,
                        mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ResumeStateError(f"GETATrainer: checkpoint {path!r}: {_OPTIMIZER} is unreadable "
                               f"({type(e).__name__}: {e})", ["optimizer_state"]) from None
    qasso = sd.get("qasso") if isinstance(sd, dict) else None
    if not isinstance(qasso, dict):
        raise ResumeStateError(f"GETATrainer: checkpoint {path!r}: {_OPTIMIZER} holds no QASSO "
                               "state (it was not written by GETATrainer)", ["optimizer_state"])
    try:
        check_state(qasso, cfg, space, who=f"GETATrainer: checkpoint {path!r}")
    except StateMismatchError as e:
        msg = str(e)
        if e.differences:
            listed = ", ".join(f"--geta_{k} (saved {_show(a)}, now {_show(b)})"
                               for k, (a, b) in e.differences.items())
            msg = (f"GETATrainer: checkpoint {path!r} was trained with other GETA settings: "
                   f"{listed}; resume with the flags it was trained with, or start a new run "
                   "in another output_dir")
        raise ResumeStateError(msg, e.fields) from None
    return True


def _show(v) -> str:
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return json.dumps(v) if not isinstance(v, str) else v


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
