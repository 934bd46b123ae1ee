"""What a QASSO checkpoint must agree on before it is resumed.

A QASSO state (format ``geta_hf.QASSO/3``) records the full :class:`GETAConfig` and the search
space it was trained on: the QADG's :meth:`~geta_hf.graph.qadg.QADG.fingerprint` plus the list of
families and of quantizers. :func:`check_state` compares them with the run that loads it and
raises :class:`StateMismatchError` naming every differing field, so a resume can never continue
one run under another run's sparsity, bit ranges, periods or units. It also validates the
progress fields (step, period, unit ids, frozen bits) so that a damaged state fails with a
clear message instead of an ``IndexError``/``OverflowError`` deep inside.
"""

from __future__ import annotations

import hashlib
import json
from numbers import Integral
from typing import Any, Dict, Mapping, Optional, Sequence

from ..config import MAX_BITS, MIN_BITS, GETAConfig
from ..graph.qadg import QADG
from .layout import QuantTable

__all__ = ["STATE_FORMAT", "StateMismatchError", "search_space", "check_state", "check_progress",
           "check_same_run"]

STATE_FORMAT = "geta_hf.QASSO/3"
_OLD_FORMATS = ("geta_hf.QASSO/1", "geta_hf.QASSO/2")


class StateMismatchError(ValueError):
    """A QASSO state that does not belong to this run. ``fields`` names what differs
    (GETAConfig field names, ``"search_space"`` or ``"format"``)."""

    def __init__(self, message: str, fields: Sequence[str],
                 differences: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        self.fields = list(fields)
        #: ``{GETAConfig field: (saved value, this run's value)}`` for config mismatches
        self.differences = dict(differences or {})


def search_space(qadg: QADG, quant: QuantTable) -> Dict[str, Any]:
    """The search space QASSO trains: QADG fingerprint, families and quantizers (JSON-safe)."""
    quantizers = []
    for i, (name, kind) in enumerate(zip(quant.layer_names, quant.kinds)):
        shape = list(quant.weights[i].shape) if i < quant.n_weight else None
        quantizers.append([name, kind, shape])
    h = hashlib.sha256(qadg.fingerprint().encode())
    h.update(json.dumps(quantizers).encode())
    return {"fingerprint": h.hexdigest(),
            "families": [[f.name, f.kind.value, f.num_units] for f in qadg.families],
            "quantizers": quantizers}


def _describe(key: str, e: Sequence[Any]) -> str:
    if key == "families":  # [name, kind, units]
        return f"{e[0]} ({e[1]}, {e[2]} units)"
    shape = "" if e[2] is None else " " + "x".join(str(x) for x in e[2])  # [layer, kind, shape]
    return f"{e[0]} ({e[1]}{shape})"


def _space_differences(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    """A readable account of how two search spaces differ."""
    parts = []
    for key in ("families", "quantizers"):
        a = {json.dumps(e): e for e in saved.get(key) or []}
        b = {json.dumps(e): e for e in mine.get(key) or []}
        if list(a) == list(b):
            continue
        for entries, other, where in ((a, b, "the checkpoint"), (b, a, "this run")):
            only = [_describe(key, e) for k, e in entries.items() if k not in other]
            if only:
                parts.append(f"{key} only in {where}: {', '.join(only[:3])}"
                             + (" ..." if len(only) > 3 else ""))
        if set(a) == set(b):
            parts.append(f"the {key} are listed in another order")
    if not parts:
        parts.append("the same families, but their units own other parameter slices")
    return "; ".join(parts)


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def check_state(saved: Mapping[str, Any], cfg: GETAConfig, space: Mapping[str, Any],
                who: str = "QASSO.load_state_dict") -> None:
    """Raise :class:`StateMismatchError` unless ``saved`` (a state's ``"qasso"`` entry) was
    written under ``cfg`` on the search space ``space`` (:func:`search_space`)."""
    fmt = saved.get("format") if isinstance(saved, Mapping) else None
    if fmt in _OLD_FORMATS:
        raise StateMismatchError(
            f"{who}: the state has format {fmt!r} (an older geta-hf), which does not record the "
            "GETA configuration and search space it was trained with, so it cannot be checked "
            "against this run; finish that run with the geta-hf version that wrote it, or "
            "restart the compression", ["format"])
    if fmt != STATE_FORMAT:
        raise StateMismatchError(f"{who}: unknown state format {fmt!r}; expected "
                                 f"{STATE_FORMAT!r} (written by QASSO.state_dict())", ["format"])
    for key in ("config", "search_space"):
        if not isinstance(saved.get(key), Mapping):
            raise StateMismatchError(f"{who}: the state's {key!r} entry is missing or not a dict",
                                     [key])
    try:
        saved_cfg = GETAConfig.from_dict(dict(saved["config"]))
    except (TypeError, ValueError) as e:
        raise StateMismatchError(f"{who}: the state's GETA configuration is invalid ({e})",
                                 ["config"]) from None
    diff = saved_cfg.diff(cfg)
    if diff:
        listed = ", ".join(f"{k} (saved {_fmt(a)}, now {_fmt(b)})" for k, (a, b) in diff.items())
        raise StateMismatchError(
            f"{who}: the state was saved with other GETA settings: {listed}; resume with the "
            "settings it was trained with", list(diff), diff)
    if saved["search_space"].get("fingerprint") != space["fingerprint"]:
        raise StateMismatchError(
            f"{who}: the state was saved on another search space "
            f"({_space_differences(saved['search_space'], space)}); resume with the same model, "
            "QADG and quantized layers", ["search_space"])


def check_same_run(s: Mapping[str, Any], variant: str, plan, num_quantizers: Sequence[int]) -> None:
    """The saved variant, step count, schedule, unit count and quantizer counts must equal this
    optimizer's (``plan``: its :class:`~geta_hf.optim.schedule.StagePlan`); ``ValueError``
    naming the first that differs."""
    sched = plan.schedule
    checks = {
        "variant": (s.get("variant"), variant),
        "total_steps": (s.get("total_steps"), plan.total_steps),
        "schedule": (list(s.get("schedule") or []),
                     [sched.warmup_end, sched.projection_end, sched.joint_end]),
        "num_groups": (s.get("num_groups"), plan.num_groups),
        "num_quantizers": (list(s.get("num_quantizers") or []), list(num_quantizers)),
    }
    for key, (saved, mine) in checks.items():
        if saved != mine:
            raise ValueError(f"QASSO.load_state_dict: the saved {key} is {saved!r} but this "
                             f"optimizer has {mine!r}; build it with the same model, QADG, "
                             "GETAConfig, variant and total_steps")


def check_param_groups(saved: Sequence[Mapping[str, Any]], mine: Sequence[Mapping[str, Any]]
                       ) -> None:
    """The saved dense optimizer's parameter groups must be this one's (by name and size);
    ``ValueError`` naming both otherwise."""
    def shape(groups):
        return [(g.get("name"), len(g.get("params", ()))) for g in groups]

    if shape(saved) != shape(mine):
        raise ValueError(
            f"QASSO.load_state_dict: the saved parameter groups (name, size) are {shape(saved)} "
            f"but this optimizer has {shape(mine)}; a nonzero weight_decay adds the group "
            "'weights_no_decay' for the no_decay parameters (earlier geta-hf versions kept "
            "them in 'weights'), so resume with the weight decay and no_decay parameters the "
            "state was saved with")


def _int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_progress(s: Mapping[str, Any], num_groups: int, n_quant: int, pruning_periods: int,
                   who: str = "QASSO.load_state_dict") -> None:
    """Validate the progress fields of a state (types and ranges), naming the bad field."""
    def bad(field: str, value: Any, allowed: str) -> ValueError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ValueError(f"{who}: the state's {field} is {shown}; allowed: {allowed}")

    for field in ("step", "skipped_steps", "forget_budget_bound_steps"):
        v = s.get(field, 0)
        if not _int(v) or v < 0:
            raise bad(field, v, "an integer >= 0")
    period = s.get("period")
    if not _int(period) or not -1 <= period < max(pruning_periods, 1):
        raise bad("period", period, f"an integer in [-1, {max(pruning_periods, 1)})")
    for field in ("pruned_units", "active_units"):
        ids = s.get(field)
        if not isinstance(ids, (list, tuple)) or not all(_int(i) and 0 <= i < num_groups
                                                         for i in ids):
            raise bad(field, ids, f"a list of unit ids in [0, {num_groups})")
        if len(set(ids)) != len(ids):
            raise bad(field, ids, "unit ids listed once each")
    if set(s["pruned_units"]) & set(s["active_units"]):
        raise bad("active_units", s["active_units"], "units not already pruned")
    achieved = s.get("achieved_units")
    if achieved is not None and (not _int(achieved) or not 0 <= achieved <= num_groups):
        raise bad("achieved_units", achieved, f"None or an integer in [0, {num_groups}]")
    fb = s.get("frozen_bits")
    if fb is not None and (not isinstance(fb, (list, tuple)) or len(fb) != n_quant
                           or not all(_int(b) and MIN_BITS <= b <= MAX_BITS for b in fb)):
        raise bad("frozen_bits", fb, f"None or {n_quant} integers in [{MIN_BITS}, {MAX_BITS}]")
