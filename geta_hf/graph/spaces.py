"""Index spaces: a union-find over tensor-dimension "atoms" with product and concat refinement.

Every dimension of every tensor in the captured graph is described as a *product* of atoms
(major to minor; size-1 dimensions have no atom). An atom is an index space of a given size. Ops
impose constraints that two index spaces are the same (``union``), or that a space is made of
smaller ones:

* a **product** split ``A = [H, D]`` (a reshape ``(H*D,) -> (H, D)``: element ``h*D + d`` of ``A`` is
  element ``h`` of ``H`` and ``d`` of ``D``), e.g. attention heads;
* a **concat** split ``A = B (+) C`` (a slice or ``cat``: the first ``|B|`` elements of ``A`` are
  ``B``, the rest ``C``), e.g. a fused QKV or gate/up projection.

Splits are stored on the class representative, so every member of a class shares them. Two classes
with different splits are reconciled by common refinement (mixed-radix alignment for products,
common boundaries for concats). A space that an op forbids to shrink (a norm reduces over it, the
model outputs it, ...) is *pinned*; pinning a class pins everything it is made of.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

__all__ = ["SpaceAlgebra"]

PROD, CAT = "prod", "cat"


class SpaceAlgebra:
    """Union-find with product/concat splits, pins and origin tags (see module docstring)."""

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.split: Dict[int, Tuple[str, Tuple[int, ...]]] = {}
        self.pinned: Dict[int, str] = {}
        self.tags: Dict[int, Set[str]] = {}

    # ------------------------------------------------------------------ basics
    def new(self, size: int, pin: Optional[str] = None, tag: Optional[str] = None) -> int:
        """A new index space of ``size`` entries (optionally pinned or tagged); returns its id."""
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        if pin:
            self.pinned[i] = pin
        if tag:
            self.tags[i] = {tag}
        return i

    def find(self, a: int) -> int:
        """Representative of ``a``'s union-find class (with path compression)."""
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def children(self, a: int) -> Tuple[int, ...]:
        """The parts ``a`` was split into, or ``()``."""
        sp = self.split.get(self.find(a))
        return sp[1] if sp else ()

    def is_pinned(self, a: int) -> bool:
        """Whether ``a``'s class is unprunable."""
        return self.find(a) in self.pinned

    def pin_reason(self, a: int) -> Optional[str]:
        """Why ``a``'s class is unprunable, or ``None``."""
        return self.pinned.get(self.find(a))

    def has_tag(self, a: int, tag: str) -> bool:
        """Whether ``a``'s class carries ``tag``."""
        return tag in self.tags.get(self.find(a), ())

    def pin(self, a: int, reason: str) -> None:
        """Pin ``a``'s class and, recursively, every space it is made of."""
        stack = [a]
        while stack:
            r = self.find(stack.pop())
            if r in self.pinned:  # invariant: descendants of a pinned class are pinned
                continue
            self.pinned[r] = reason
            stack.extend(self.children(r))

    def pin_all(self, atoms: Sequence[int], reason: str) -> None:
        """Pin every space in ``atoms`` with ``reason``."""
        for a in atoms:
            self.pin(a, reason)

    # ------------------------------------------------------------------ refinement
    def _refine(self, a: int, sizes: Sequence[int], kind: str) -> List[int]:
        r = self.find(a)
        assert r not in self.split, "refining an already split space"
        assert (kind == PROD and _prod(sizes) == self.size[r]) or \
               (kind == CAT and sum(sizes) == self.size[r])
        reason = self.pinned.get(r)
        kids = [self.new(s, pin=reason) for s in sizes]
        self.split[r] = (kind, tuple(kids))
        return kids

    def refine_prod(self, a: int, sizes: Sequence[int]) -> List[int]:
        """Split ``a`` as a product (outer x inner, e.g. heads x head_dim); returns the parts."""
        return self._refine(a, sizes, PROD)

    def refine_cat(self, a: int, sizes: Sequence[int]) -> List[int]:
        """Split ``a`` as a concatenation of ``sizes`` (e.g. a fused q/k/v); returns the parts."""
        return self._refine(a, sizes, CAT)

    # ------------------------------------------------------------------ unification
    def union(self, a: int, b: int) -> bool:
        """Declare two equal-size spaces identical. Returns False on a layout conflict."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            self.pin(ra, "size mismatch")
            self.pin(rb, "size mismatch")
            return False
        sa, sb = self.split.pop(ra, None), self.split.pop(rb, None)
        pa, pb = self.pinned.pop(ra, None), self.pinned.pop(rb, None)
        ta, tb = self.tags.pop(ra, set()), self.tags.pop(rb, set())
        self.parent[rb] = ra
        if ta or tb:
            self.tags[ra] = ta | tb
        ok = True
        if sa is not None:
            self.split[ra] = sa
        elif sb is not None:
            self.split[ra] = sb
        if sa is not None and sb is not None:
            if sa[0] == sb[0] == PROD:
                ok = self.align(sa[1], sb[1])
            elif sa[0] == sb[0] == CAT:
                ok = self.align_cat(sa[1], sb[1])
            else:
                ok = False
        reason = pa or pb or (None if ok else "incompatible layouts (product vs concat)")
        if reason:
            self.pin(ra, reason)
        return ok

    def align(self, seq_a: Sequence[int], seq_b: Sequence[int]) -> bool:
        """Unify two products of atoms (major to minor) with the same total size.

        Mixed-radix alignment: walking from the major end, equal-size atoms are unified and a
        larger atom is split into ``[smaller, rest]``. Returns False (and pins both sides) when
        the two layouts cannot be reconciled.
        """
        return self._align(seq_a, seq_b, PROD)

    def align_cat(self, parts_a: Sequence[int], parts_b: Sequence[int]) -> bool:
        """Unify two concatenations with the same total size (common boundaries)."""
        return self._align(parts_a, parts_b, CAT)

    def _align(self, seq_a: Sequence[int], seq_b: Sequence[int], kind: str) -> bool:
        """:meth:`align` (``kind=PROD``: the smaller size must divide the larger) or
        :meth:`align_cat` (``CAT``: the larger is cut at the smaller's size)."""
        A, B = list(seq_a), list(seq_b)
        ok = True
        while A and B:
            a, b = self.find(A[0]), self.find(B[0])
            na, nb = self.size[a], self.size[b]
            if na == nb:
                ok = self.union(a, b) and ok
                A.pop(0)
                B.pop(0)
                continue
            big, small, seq = (a, nb, A) if na > nb else (b, na, B)
            sp = self.split.get(big)
            if sp is not None and sp[0] == kind:
                seq[0:1] = list(sp[1])
                continue
            if sp is not None or (kind == PROD and self.size[big] % small):
                self._fail(list(seq_a) + list(seq_b), "incompatible reshapes" if kind == PROD
                           else "incompatible layouts (product vs concat)")
                return False
            rest = self.size[big] // small if kind == PROD else self.size[big] - small
            seq[0:1] = self._refine(big, [small, rest], kind)
        if A or B:
            self._fail(list(seq_a) + list(seq_b), "size mismatch")
            return False
        return ok

    def _fail(self, atoms: Sequence[int], reason: str) -> None:
        for x in atoms:
            self.pin(x, reason)

    # ------------------------------------------------------------------ reshapes and slices
    def reshape(self, in_dims: Sequence[Sequence[int]], out_shape: Sequence[int]
                ) -> Optional[List[List[int]]]:
        """Map a row-major reshape onto atoms; None when the layouts cannot be matched."""
        seq = [a for dim in in_dims for a in dim]
        out: List[List[int]] = []
        for s in out_shape:
            if s == 1:
                out.append([])
                continue
            cur: List[int] = []
            prod = 1
            while prod < s:
                if not seq:
                    return None
                a = self.find(seq[0])
                n = self.size[a]
                if s % (prod * n) == 0:
                    cur.append(a)
                    seq.pop(0)
                    prod *= n
                    continue
                if s % prod:
                    return None
                need = s // prod
                sp = self.split.get(a)
                if sp is not None and sp[0] == PROD:
                    seq[0:1] = list(sp[1])
                    continue
                if sp is not None or n % need:
                    return None
                seq[0:1] = self.refine_prod(a, [need, n // need])
            if prod != s:
                return None
            out.append(cur)
        if seq:
            return None
        return out

    def slice_dim(self, atoms: Sequence[int], start: int, end: int) -> Optional[List[int]]:
        """Atoms of ``dim[start:end]`` (step 1); None when the slice crosses a product layout."""
        atoms = [self.find(a) for a in atoms]
        total = _prod(self.size[a] for a in atoms)
        start, end = max(0, start), min(end, total)
        if start == 0 and end == total:
            return list(atoms)
        while True:
            if not atoms:
                return None
            if len(atoms) == 1:
                a = self.find(atoms[0])
                sp = self.split.get(a)
                if sp is not None and sp[0] == PROD:
                    atoms = list(sp[1])
                    continue
                part = self._cat_range(a, start, end)
                return None if part is None else ([] if self.size[part] == 1 else [part])
            minor = _prod(self.size[self.find(x)] for x in atoms[1:])
            if start % minor or end % minor:
                return None
            head = self._cat_range(self.find(atoms[0]), start // minor, end // minor)
            if head is None:
                return None
            rest = [self.find(x) for x in atoms[1:]]
            return rest if self.size[head] == 1 else [head] + rest

    def _cat_range(self, a: int, start: int, end: int) -> Optional[int]:
        """The concat part of ``a`` covering ``[start, end)``, refining ``a`` as needed."""
        a = self.find(a)
        n = self.size[a]
        if start == 0 and end == n:
            return a
        sp = self.split.get(a)
        if sp is None:
            sizes = [s for s in (start, end - start, n - end) if s > 0]
            kids = self.refine_cat(a, sizes)
            part = kids[1] if start > 0 else kids[0]
        elif sp[0] == CAT:
            parts, off, covered = list(sp[1]), 0, []
            for p in parts:
                p = self.find(p)
                lo, hi = off, off + self.size[p]
                off = hi
                if hi <= start or lo >= end:
                    continue
                sub = self._cat_range(p, max(start, lo) - lo, min(end, hi) - lo)
                if sub is None:
                    return None
                covered.append(sub)
            if len(covered) == 1:
                part = covered[0]
            else:
                part = self.new(end - start)
                self.split[part] = (CAT, tuple(covered))
        else:
            return None
        if self.size[self.find(part)] == 1:
            self.pin(part, "a single element is indexed")
        return self.find(part)

    def concat(self, parts: Sequence[Sequence[int]]) -> int:
        """A new space that is the concatenation of the given dims (each a product of atoms)."""
        kids = []
        for dim in parts:
            n = _prod(self.size[self.find(a)] for a in dim)
            if len(dim) == 1:
                kids.append(self.find(dim[0]))
                continue
            k = self.new(n, pin=None if dim else "concatenated size-1 slice")
            if dim:
                self.align([k], dim)
            kids.append(k)
        out = self.new(sum(self.size[self.find(k)] for k in kids))
        self.split[out] = (CAT, tuple(kids))  # a pinned part does not pin the others
        return out

    # ------------------------------------------------------------------ queries
    def unit_candidates(self, a: int) -> List[int]:
        """The spaces whose indices are the natural removal units of ``a``.

        Leaf -> itself; product -> the candidates of its major factor; concat -> the union of
        its parts' candidates.
        """
        r = self.find(a)
        sp = self.split.get(r)
        if sp is None:
            return [r]
        if sp[0] == PROD:
            return self.unit_candidates(sp[1][0])
        out: List[int] = []
        for k in sp[1]:
            for c in self.unit_candidates(k):
                if c not in out:
                    out.append(c)
        return out

    def contains(self, a: int) -> Set[int]:
        """Every class ``a`` is made of, itself included."""
        r = self.find(a)
        out = {r}
        for k in self.children(r):
            out |= self.contains(k)
        return out

    def labels(self, a: int, target: int) -> Optional[torch.Tensor]:
        """For each flat index of ``a``, its index in class ``target`` (-1 where not covered).

        None if some index of ``a`` maps to ``target`` ambiguously (the class occurs twice
        along one product).
        """
        r, t = self.find(a), self.find(target)
        n = self.size[r]
        if r == t:
            return torch.arange(n)
        sp = self.split.get(r)
        if sp is None:
            return torch.full((n,), -1, dtype=torch.long)
        kind, kids = sp
        kids = [self.find(k) for k in kids]
        if kind == CAT:
            pieces = []
            for k in kids:
                lab = self.labels(k, t)
                if lab is None:
                    return None
                pieces.append(lab)
            return torch.cat(pieces)
        sizes = [self.size[k] for k in kids]
        out = torch.full((n,), -1, dtype=torch.long)
        flat = torch.arange(n)
        stride = n
        found = False
        for k, s in zip(kids, sizes):
            stride //= s
            lab = self.labels(k, t)
            if lab is None:
                return None
            if (lab >= 0).any():
                if found:
                    return None
                found = True
                out = lab[(flat // stride) % s]
        return out


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p
