"""Dense bit packing of signed integer codes (any width from 2 to 16 bits).

A ``b``-bit code ``c`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` is stored as the unsigned value
``c + 2^(b-1)``, least significant bit first, in a continuous little-endian bit stream of bytes.
``n`` codes take exactly ``ceil(n * b / 8)`` bytes (two per byte at 4 bits, one per byte at 8).
Work is chunked (a multiple of 8 codes per chunk, so every chunk starts on a byte boundary) to
bound the temporary memory.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes", "find_code"]

_CHUNK = 1 << 20  # codes per chunk; a multiple of 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to store ``numel`` codes of ``bits`` bits each, packed."""
    return (int(numel) * int(bits) + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits: got {bits!r}; allowed: an integer in [2, 16]")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into a 1-D ``uint8`` tensor of ``packed_nbytes`` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    half = 1 << (bits - 1)
    if flat.numel() and (int(flat.abs().max()) >= half):
        raise ValueError(f"pack_codes: a code exceeds the {bits}-bit range +-{half - 1}")
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device))
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        u = flat[start:start + _CHUNK] + half
        stream = ((u[:, None] >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8) * weights).sum(1).to(torch.uint8))
    if not out:
        return torch.zeros(0, dtype=torch.uint8, device=codes.device)
    return torch.cat(out)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a 1-D ``int16`` tensor of ``numel`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("unpack_codes: expected a 1-D uint8 tensor")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"unpack_codes: {packed.numel()} bytes cannot hold exactly {numel} "
                         f"{bits}-bit codes (expected {packed_nbytes(numel, bits)} bytes)")
    half = 1 << (bits - 1)
    bit_idx = torch.arange(8, dtype=torch.int32, device=packed.device)
    shifts = torch.arange(bits, dtype=torch.int32, device=packed.device)
    out = []
    chunk_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, packed.numel(), chunk_bytes)):
        n = min(_CHUNK, numel - i * _CHUNK)
        stream = ((packed[start:start + chunk_bytes].to(torch.int32)[:, None] >> bit_idx) & 1)
        stream = stream.reshape(-1)[: n * bits].view(n, bits)
        out.append(((stream << shifts).sum(1) - half).to(torch.int16))
    if not out:
        return torch.zeros(0, dtype=torch.int16, device=packed.device)
    return torch.cat(out)


def find_code(packed: torch.Tensor, bits: int, numel: int, code: int) -> tuple:
    """``(index of the first, count)`` of the ``numel`` packed codes equal to ``code`` (index -1
    when there is none), without unpacking: eight ``bits``-bit codes fill exactly ``bits`` bytes,
    so the stream is read as rows of ``bits`` bytes and each of the eight code positions of all
    rows is extracted at once. ``code`` may be ``-2^(bits-1)`` (raw value 0), which
    :func:`pack_codes` never writes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"find_code: expected a 1-D uint8 tensor of {packed_nbytes(numel, bits)} bytes")
    rows = -(-int(numel) // 8)
    body = torch.zeros(rows * bits, dtype=torch.int32, device=packed.device)
    body[: packed.numel()] = packed
    body = body.view(rows, bits)
    raw, mask = code + (1 << (bits - 1)), (1 << bits) - 1
    first, count = -1, 0
    for j in range(8):  # code j of every row starts at bit j * bits of the row
        lo = j * bits
        k0, k1 = lo // 8, (lo + bits - 1) // 8
        v = body[:, k0].clone()
        for k in range(k0 + 1, k1 + 1):
            v |= body[:, k] << (8 * (k - k0))
        idx = torch.nonzero(((v >> (lo - 8 * k0)) & mask) == raw).view(-1) * 8 + j
        idx = idx[idx < numel]  # the zero padding after the last code is not a code
        if idx.numel():
            count += int(idx.numel())
            first = int(idx[0]) if first < 0 else min(first, int(idx[0]))
    return first, count
