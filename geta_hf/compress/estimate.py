"""Cheap estimate of the compressed model's MACs and BOPs while training.

`model_stats` runs the model; during training we only want a number per logging step. The
estimate runs the model once at set-up (dense MACs per layer), maps every layer to the families
that shrink it (a linear layer's output and input dimensions, an attention layer's heads), and
later multiplies each layer's dense MACs by the kept fractions read from the group norms and by
its current bit widths (method §4.3).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..graph.qadg import QADG
from ..registry import linear_type_of
from .metrics import layer_bits, model_stats

__all__ = ["BopsEstimator"]


class BopsEstimator:
    """Estimates MACs/BOPs of the model that ``compress_model`` would produce right now."""

    def __init__(self, model: nn.Module, qadg: QADG, example_inputs: Mapping[str, Any]) -> None:
        stats = model_stats(model, example_inputs, reference=None)
        self.qadg = qadg
        mods = dict(model.named_modules())
        out_of: Dict[tuple, int] = {}
        in_of: Dict[tuple, int] = {}
        for fi, f in enumerate(qadg.families):
            for m in f.members:
                out_of[(m.param, m.dim)] = fi
            for m in f.consumers:
                in_of[(m.param, m.dim)] = fi
        self.rows: List[dict] = []
        for r in stats["layers"]:
            mod = mods.get(r["name"])
            fams: List[int] = []
            if r["kind"] == "linear" and mod is not None:
                w = r["name"] + ".weight"
                kind = linear_type_of(mod)
                out_dim = kind.weight_out_dim if kind is not None else 0
                in_dim = 1 - out_dim
                for key, table in (((w, out_dim), out_of), ((w, in_dim), in_of)):
                    if key in table:
                        fams.append(table[key])
            elif r["kind"] == "attention":
                for fi, f in enumerate(qadg.families):
                    if f.kind != "channels" and (fnmatch.fnmatchcase(r["name"], f.layer) or
                                                  fnmatch.fnmatchcase(r["name"], f.layer + ".*")):
                        fams.append(fi)
                        break
            self.rows.append({"name": r["name"], "kind": r["kind"], "macs": r["macs"],
                              "families": fams, "module": mod})
        self.dense_macs = sum(r["macs"] for r in self.rows)

    def _kept(self, model: nn.Module, norms: Optional[torch.Tensor]) -> List[float]:
        if norms is None:
            norms = self.qadg.unit_norms(model)
        kept = []
        for f in self.qadg.families:
            n = norms[f.offset:f.offset + f.num_units]
            kept.append(max(int((n != 0).sum()), 1) / f.num_units)
        return kept

    def _macs(self, row: dict, kept: List[float]) -> float:
        m = float(row["macs"])
        for fi in row["families"]:
            m *= kept[fi]
        return m

    @torch.no_grad()
    def weight_bit_costs(self, model: nn.Module, layers: List[nn.Module]):
        """How the relative BOPs depend on the weight bits of ``layers``, right now.

        Returns ``(costs, fixed)``: relative BOPs = ``fixed + sum_l costs[l] * weight_bits[l]``,
        ``costs[l]`` = the layer's current MACs x its input bits / dense fp32 BOPs, and
        ``fixed`` = everything else (layers not listed, attention products)."""
        kept = self._kept(model, None)
        index = {id(m): i for i, m in enumerate(layers)}
        costs = [0.0] * len(layers)
        fixed = 0.0
        dense = (float(self.dense_macs) or 1.0) * 32 * 32
        for r in self.rows:
            m = self._macs(r, kept)
            mod = r["module"]
            if r["kind"] == "linear" and mod is not None and id(mod) in index:
                costs[index[id(mod)]] += m * layer_bits(mod)["act"] / dense
            else:
                bits = layer_bits(mod) if (r["kind"] == "linear" and mod is not None) \
                    else {"weight": 32, "act": 32}
                fixed += m * bits["weight"] * bits["act"] / dense
        return costs, fixed

    @torch.no_grad()
    def estimate(self, model: nn.Module, norms: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """``{"macs", "bops", "relative_macs", "relative_bops"}`` (relative to dense fp32)."""
        kept = self._kept(model, norms)
        macs = bops = 0.0
        for r in self.rows:
            m = self._macs(r, kept)
            bits = layer_bits(r["module"]) if (r["kind"] == "linear" and r["module"] is not None) \
                else {"weight": 32, "act": 32}
            macs += m
            bops += m * bits["weight"] * bits["act"]
        dense = float(self.dense_macs) or 1.0
        return {"macs": macs, "bops": bops, "relative_macs": macs / dense,
                "relative_bops": bops / (dense * 32 * 32)}
