"""The GETA fake quantizer as a custom autograd function, and its bit-width math.

Forward (method §1.1, symmetric, ``q_s = 0``)::

    u(x) = min(|x|, q_m) ** t                      (t = 1 for the linear quantizer)
    Q(x) = sign(x) * d * round(u(x) / d)

Backward (§1.3). Every gradient is the exact gradient of the *surrogate*
``sign(x) * (u(x) + d * rho)`` in which the rounding residual ``rho = round(u/d) - u/d`` is held
fixed (the straight-through estimator). Written out:

* ``dQ/dd   = sign(x) * (round(u/d) - u/d)``
* ``dQ/dq_m = sign(x) * t * q_m**(t-1)`` where ``|x| > q_m``, else 0
* ``dQ/dt   = sign(x) * u * ln(min(|x|, q_m))`` (0 at ``x = 0``)
* ``dQ/dx   = t * |x|**(t-1)`` where ``|x| <= q_m``, else 0.

The input gradient deviates from the reference code on purpose (§6.1.4): it is cut where the
quantizer saturates (``|x| > q_m``), not at a fixed ``+-2``, and it keeps the ``t |x|^(t-1)``
factor of the non-linear map so that it is the true derivative of the surrogate.

Every step is a fused ``torch`` expression on whole tensors: no masked in-place writes, no
``.item()`` and no NaN checks that sync the host.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["fake_quantize", "bit_width", "d_for_bits", "T_MIN", "EPS"]

#: Lower bound applied to ``d`` and ``q_m`` inside the quantizer (keeps all-zero tensors finite).
EPS = 1e-12
#: Lower bound applied to the exponent ``t`` inside the quantizer (``t <= 0`` is meaningless).
T_MIN = 1e-2
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Smallest magnitude used inside ``log`` (x = 0 must give finite, zero gradients).
_LOG_FLOOR = 1e-30


def _prepare_scalars(d: torch.Tensor, q_m: torch.Tensor, t: Optional[torch.Tensor]):
    d_ = d.clamp_min(EPS)
    qm = q_m.abs().clamp_min(EPS)
    t_ = None if t is None else t.clamp_min(T_MIN)
    return d_, qm, t_


class _GETAFakeQuant(torch.autograd.Function):
    """Autograd function implementing §1.1 (forward) and §1.3 (backward).

    Written for speed on large activation tensors: float arithmetic only (no boolean masks),
    0-dim tensor operands (a scalar fast path), in-place updates of fresh temporaries, and no
    transcendental function in the backward pass (the non-linear map's ``u = c^t`` is saved).
    """

    @staticmethod
    def forward(ctx, x, d, q_m, t):  # type: ignore[override]
        d_, qm, t_ = _prepare_scalars(d, q_m, t)
        dt = x.dtype
        d_x, qm_x = d_.to(dt), qm.to(dt)
        if t_ is None:
            # symmetric linear quantizer: round is odd, so sign(x) d round(|c|/d) = d round(c/d)
            out = torch.minimum(x, qm_x)
            torch.maximum(out, -qm_x, out=out)
            out.div_(d_x).round_().mul_(d_x)
            ctx.save_for_backward(x, d_, qm)
        else:
            u = x.abs()
            torch.minimum(u, qm_x, out=u)
            u.clamp_min_(_LOG_FLOOR).log_().mul_(t_.to(dt)).exp_()  # u = min(|x|, q_m)^t
            out = torch.div(u, d_x).round_().mul_(d_x).copysign_(x)
            ctx.save_for_backward(x, d_, qm, t_, u)
        ctx.scalar_dtypes = (d.dtype, q_m.dtype, None if t is None else t.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # Temporaries are few and reused (buffers A, B, C below): on CPU every fresh large
        # allocation costs page faults, which dominate this otherwise memory-bound code.
        d_dt, qm_dt, t_dt = ctx.scalar_dtypes
        g = grad_out.contiguous()
        g_flat = g.view(-1)
        if t_dt is None:
            x, d_, qm = ctx.saved_tensors
            dt = x.dtype
            d_x, qm_x = d_.to(dt), qm.to(dt)
            c = torch.minimum(x, qm_x)  # A: clamp(x, -q_m, q_m)
            torch.maximum(c, -qm_x, out=c)
            sat = torch.sub(x, c).sign_()  # B: sign(x) where |x| > q_m, else 0
            grad_qm = torch.dot(g_flat, sat.view(-1))
            grad_x = torch.mul(g, sat.abs_().neg_().add_(1.0))  # G where |x| <= q_m, else 0
            z = c.div_(d_x)
            resid = torch.round(z, out=sat).sub_(z)  # round(c/d) - c/d = sign(x)(round(u/d) - u/d)
            grad_d = torch.dot(g_flat, resid.view(-1))
            return grad_x, grad_d.to(d_dt), grad_qm.to(qm_dt), None
        x, d_, qm, t_, u = ctx.saved_tensors
        dt = x.dtype
        d_x, qm_x, t_x = d_.to(dt), qm.to(dt), t_.to(dt)
        c = x.abs()  # A
        sat = torch.sub(c, qm_x).sign_().clamp_min_(0.0)  # B: 1 where |x| > q_m, else 0
        torch.minimum(c, qm_x, out=c).clamp_min_(_LOG_FLOOR)  # A: c = min(|x|, q_m), floored
        g_s = x.sign().mul_(g)  # C: G sign(x)
        gs_flat = g_s.view(-1)
        grad_qm = torch.dot(gs_flat, sat.view(-1)) * t_x * qm_x.pow(t_x - 1.0)
        # dQ/dx = t c^(t-1) = t u / c where |x| <= q_m (c is floored, so x = 0 stays finite)
        inside = sat.neg_().add_(1.0)  # B: 1 where |x| <= q_m, else 0
        grad_x = torch.mul(g, inside).mul_(u).div_(c).mul_(t_x)
        z = torch.div(u, d_x, out=sat)  # B: u / d
        u_log_c = c.log_().mul_(u)  # A: u ln c
        grad_t = torch.dot(gs_flat, u_log_c.view(-1))
        resid = torch.round(z, out=c).sub_(z)  # A: round(u/d) - u/d
        grad_d = torch.dot(gs_flat, resid.view(-1))
        return grad_x, grad_d.to(d_dt), grad_qm.to(qm_dt), grad_t.to(t_dt)


def fake_quantize(x: torch.Tensor, d: torch.Tensor, q_m: torch.Tensor,
                  t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GETA fake quantization of ``x`` with step ``d``, clip ``q_m`` and exponent ``t``.

    ``d``, ``q_m`` and ``t`` are 0-dim tensors (one per tensor quantized); ``t=None`` selects the
    linear quantizer. Differentiable in all four arguments (see module docstring).

    float16/bfloat16 inputs are quantized in float32 and the result is cast back: with 8 or 11
    mantissa bits, ``min(|x|, q_m)^t`` and ``u / d`` drift by several levels at the clip, which
    would put codes outside the learned bit width (the packed model is computed in float32).
    """
    if x.dtype in _LOW_PRECISION:
        return _GETAFakeQuant.apply(x.float(), d, q_m, t).to(x.dtype)
    return _GETAFakeQuant.apply(x, d, q_m, t)


Number = Union[float, torch.Tensor]


def bit_width(d: Number, q_m: Number, t: Optional[Number] = None) -> torch.Tensor:
    """``b(d, q_m, t) = log2(|q_m|^t / d + 1) + 1`` (method §1.2; the ``+1`` is the sign bit)."""
    d = torch.as_tensor(d)
    q_m = torch.as_tensor(q_m, dtype=d.dtype)
    top = q_m.abs() if t is None else q_m.abs().pow(torch.as_tensor(t, dtype=d.dtype))
    return torch.log2(top / d.clamp_min(EPS) + 1.0) + 1.0


def d_for_bits(bits: Number, q_m: Number, t: Optional[Number] = None) -> torch.Tensor:
    """Inverse of :func:`bit_width`: ``d = |q_m|^t / (2^(b-1) - 1)``."""
    q_m = torch.as_tensor(q_m)
    bits = torch.as_tensor(bits, dtype=q_m.dtype if q_m.is_floating_point() else torch.float32)
    q_m = q_m.to(bits.dtype)
    top = q_m.abs() if t is None else q_m.abs().pow(torch.as_tensor(t, dtype=bits.dtype))
    return top.clamp_min(EPS) / (torch.exp2(bits - 1.0) - 1.0)
