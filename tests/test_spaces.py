"""SpaceAlgebra on its own: union-find with product/concat splits, pins, labels."""

import torch

from geta_hf.graph.spaces import SpaceAlgebra


def test_union_merges_classes_tags_and_pins():
    S = SpaceAlgebra()
    a, b, c = S.new(4, tag="expand"), S.new(4), S.new(4, pin="norm")
    assert S.union(a, b) and S.find(a) == S.find(b) and S.has_tag(b, "expand")
    assert not S.is_pinned(a)
    S.union(b, c)
    assert S.is_pinned(a) and S.pin_reason(a) == "norm"


def test_union_of_different_sizes_pins_both():
    S = SpaceAlgebra()
    a, b = S.new(4), S.new(6)
    assert not S.union(a, b)
    assert S.is_pinned(a) and S.is_pinned(b) and S.pin_reason(a) == "size mismatch"


def test_reshape_into_heads_is_a_product_split_and_labels_follow_it():
    S = SpaceAlgebra()
    hidden = S.new(12)
    out = S.reshape([[hidden]], [3, 4])  # (12,) -> (heads 3, head_dim 4)
    heads, dh = out[0][0], out[1][0]
    assert S.children(hidden) == (heads, dh)
    assert S.unit_candidates(hidden) == [S.find(heads)]
    assert S.labels(hidden, heads).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert S.labels(hidden, dh).tolist() == list(range(4)) * 3


def test_two_products_are_aligned_by_mixed_radix_refinement():
    S = SpaceAlgebra()
    a, b = S.new(24), S.new(24)
    S.refine_prod(a, [6, 4])
    S.refine_prod(b, [2, 12])
    assert S.union(a, b)
    # 24 = 2 x 3 x 4 on both sides: the 6 is split into (2, 3), the 12 into (3, 4)
    major = S.find(S.children(a)[0])
    assert [S.size[S.find(k)] for k in S.children(major)] == [2, 3]
    assert S.labels(b, S.children(major)[0]).tolist() == [0] * 12 + [1] * 12


def test_incompatible_layouts_are_pinned_not_guessed():
    S = SpaceAlgebra()
    a, b = S.new(6), S.new(6)
    S.refine_prod(a, [2, 3])
    S.refine_cat(b, [1, 5])
    assert not S.union(a, b)
    assert S.is_pinned(a)


def test_concat_and_slice_recover_the_parts():
    S = SpaceAlgebra()
    q, k, v = S.new(4), S.new(4), S.new(4)
    fused = S.concat([[q], [k], [v]])
    assert S.size[fused] == 12 and S.unit_candidates(fused) == [q, k, v]
    part = S.slice_dim([fused], 4, 8)
    assert S.find(part[0]) == S.find(k)
    assert S.labels(fused, k).tolist() == [-1] * 4 + list(range(4)) + [-1] * 4
    assert S.contains(fused) == {S.find(x) for x in (fused, q, k, v)}


def test_a_class_twice_along_one_product_has_ambiguous_labels():
    S = SpaceAlgebra()
    a, b = S.new(3), S.new(3)
    prod = S.new(9)
    S.split[prod] = ("prod", (a, b))
    S.union(a, b)
    assert S.labels(prod, a) is None
    assert isinstance(S.labels(prod, S.new(2)), torch.Tensor)
