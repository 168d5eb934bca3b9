"""Tests for medalign_platform.core.losses (see ../shared/method.md, "Teacher targets" and "Losses").

Expected values are either written out by hand or computed from the original per-sample
formulas (torch ops in the original code's style), never by calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medalign_platform.core.losses import (
    attention_distillation_loss,
    spatial_alignment_loss,
    teacher_attention_map,
    teacher_similarity,
)

ATOL = 1e-6
SQ2 = 1.0 / math.sqrt(2.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(actual: torch.Tensor, expected, atol: float = ATOL, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.detach().float(), expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------
# Original single-sample reference formulas (the original code's style, no batch dim).
# ---------------------------------------------------------------------------------------


def ref_spatial(student_visual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, D] student states vs [N, N] target."""
    s_n = F.normalize(student_visual, dim=-1)
    return F.mse_loss(s_n @ s_n.T, target)


def ref_attention_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1-D vectors; the original kl_div(log(student), teacher, 'batchmean') on L2-normed vectors."""
    s_l2 = F.normalize(student, dim=0)
    t_l2 = F.normalize(teacher, dim=0)
    return F.kl_div(torch.log(s_l2), t_l2, reduction="batchmean")


def ref_attention_probability(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s_p = student / student.sum()
    t_p = teacher / teacher.sum()
    return F.kl_div(torch.log(s_p), t_p, reduction="sum")


def ref_teacher_similarity(tokens: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """[h*w, D] tokens -> [H*W, H*W] Gram."""
    h, w = grid
    dim = tokens.shape[-1]
    x = F.normalize(tokens, dim=-1)
    x = x.T.reshape(dim, h, w)
    if tuple(grid) != tuple(out_grid):
        x = F.interpolate(x.unsqueeze(0), size=tuple(out_grid), mode="bilinear", align_corners=False)[0]
    x = x.reshape(dim, -1).T
    x = F.normalize(x, dim=-1)
    return x @ x.T


def ref_teacher_attention(cls_attention: torch.Tensor, grid, out_grid, max_normalize=True) -> torch.Tensor:
    """[h*w] -> [H*W]."""
    h, w = grid
    a = cls_attention
    if max_normalize:
        a = a / a.max()
    a = a.reshape(1, 1, h, w)
    if tuple(grid) != tuple(out_grid):
        a = F.interpolate(a, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return a.flatten()


# 1-D bilinear weights (align_corners=False) for upsampling 2 -> 4 samples, by hand:
# source x = (i + 0.5) * 0.5 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to index 1).
UP_2_TO_4 = [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]


# ---------------------------------------------------------------------------------------
# 1. Hand-computed small cases
# ---------------------------------------------------------------------------------------


class TestSpatialHand:
    def test_identity_student_vs_offdiagonal_teacher(self):
        student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # Gram = I
        teacher = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
        # errors: 0, 0.5, 0.5, 0 -> squared 0, .25, .25, 0 -> mean over 4 entries
        _close(spatial_alignment_loss(student, teacher), (0.25 + 0.25) / 4)

    def test_student_normalised_before_gram(self):
        student = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # normalised: [1,0], [1/sqrt2, 1/sqrt2]
        teacher = torch.zeros(1, 2, 2)
        # Gram = [[1, 1/sqrt2], [1/sqrt2, 1]] -> squares 1, .5, .5, 1
        _close(spatial_alignment_loss(student, teacher), (1 + 0.5 + 0.5 + 1) / 4)

    def test_batch_of_two_hand(self):
        student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]])
        teacher = torch.stack([torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.zeros(2, 2)])
        _close(spatial_alignment_loss(student, teacher), (0.125 + 0.75) / 2)

    def test_weighted_hand(self):
        student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        teacher = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
        # w = [2, 1]: element weights [[4, 2], [2, 1]] times squared errors [[0, .25], [.25, 0]]
        _close(spatial_alignment_loss(student, teacher, torch.tensor([[2.0, 1.0]])), (0.5 + 0.5) / 4)
        # w = [1, 0]: only entry (0, 0) survives, and its error is 0
        _close(spatial_alignment_loss(student, teacher, torch.tensor([[1.0, 0.0]])), 0.0)


class TestAttentionHand:
    def test_l2_mode(self):
        # s = [1,2,2]/3, t = [2,1,2]/3 after L2 normalisation (both have norm 3)
        # sum t (log t - log s) / N = (2/3 ln2 + 1/3 ln(1/2) + 0) / 3 = ln2 / 9
        s = torch.tensor([[1.0, 2.0, 2.0]])
        t = torch.tensor([[2.0, 1.0, 2.0]])
        _close(attention_distillation_loss(s, t, normalize="l2"), math.log(2) / 9)

    def test_l2_mode_explicit_formula(self):
        s_raw, t_raw = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]
        ns = math.sqrt(sum(x * x for x in s_raw))
        nt = math.sqrt(sum(x * x for x in t_raw))
        s = [x / ns for x in s_raw]
        t = [x / nt for x in t_raw]
        expected = sum(ti * (math.log(ti) - math.log(si)) for si, ti in zip(s, t)) / 3
        got = attention_distillation_loss(torch.tensor([s_raw]), torch.tensor([t_raw]), normalize="l2")
        _close(got, expected)

    def test_probability_mode(self):
        # s = [1,2,1]/4, t = [2,1,1]/4: KL = .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln 1 = ln2 / 4
        s = torch.tensor([[1.0, 2.0, 1.0]])
        t = torch.tensor([[2.0, 1.0, 1.0]])
        _close(attention_distillation_loss(s, t, normalize="probability"), math.log(2) / 4)
        # default mode is "probability"
        _close(attention_distillation_loss(s, t), math.log(2) / 4)

    def test_probability_mode_explicit_formula(self):
        s_raw, t_raw = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]
        s = [x / sum(s_raw) for x in s_raw]
        t = [x / sum(t_raw) for x in t_raw]
        expected = sum(ti * math.log(ti / si) for si, ti in zip(s, t))
        got = attention_distillation_loss(torch.tensor([s_raw]), torch.tensor([t_raw]), normalize="probability")
        _close(got, expected)

    def test_probability_mode_teacher_zero(self):
        # t = [1,0,0], s = [.5,.25,.25]: KL = 1 * ln(1/.5) = ln 2; zero teacher entries add 0
        s = torch.tensor([[2.0, 1.0, 1.0]])
        t = torch.tensor([[3.0, 0.0, 0.0]])
        _close(attention_distillation_loss(s, t, normalize="probability"), math.log(2))

    def test_l2_mode_teacher_zero(self):
        # t_l2 = [1,0,0], s_l2 = [2,1,2]/3: (1 * (0 - ln(2/3))) / 3
        s = torch.tensor([[2.0, 1.0, 2.0]])
        t = torch.tensor([[5.0, 0.0, 0.0]])
        _close(attention_distillation_loss(s, t, normalize="l2"), -math.log(2 / 3) / 3)

    def test_batch_mean_hand(self):
        s = torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
        t = torch.tensor([[2.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
        _close(attention_distillation_loss(s, t, normalize="probability"), (math.log(2) / 4 + math.log(2)) / 2)


class TestTeacherSimilarityHand:
    def test_2x2_grid_no_resize(self):
        tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]]])
        # normalised: [1,0], [0,1], [1,1]/sqrt2, [1,0]
        expected = [
            [1.0, 0.0, SQ2, 1.0],
            [0.0, 1.0, SQ2, 0.0],
            [SQ2, SQ2, 1.0, SQ2],
            [1.0, 0.0, SQ2, 1.0],
        ]
        got = teacher_similarity(tokens, grid=(2, 2), out_grid=(2, 2))
        assert got.shape == (1, 4, 4)
        assert got.dtype == torch.float32
        _close(got[0], expected)

    def test_1x1_to_2x2_is_all_ones(self):
        tokens = torch.tensor([[[0.3, -1.2, 4.0]]])
        got = teacher_similarity(tokens, grid=(1, 1), out_grid=(2, 2))
        assert got.shape == (1, 4, 4)
        _close(got[0], torch.ones(4, 4))

    def test_constant_map_resizes_to_constant(self):
        vec = torch.randn(5, generator=_gen(1))
        tokens = vec.expand(1, 9, 5).clone()  # 3x3 grid, every token identical
        got = teacher_similarity(tokens, grid=(3, 3), out_grid=(5, 4))
        assert got.shape == (1, 20, 20)
        _close(got[0], torch.ones(20, 20))

    def test_1x2_to_1x4_bilinear(self):
        tokens = torch.tensor([[[1.0, 0.0], [0.0, 5.0]]])  # normalised: [1,0], [0,1]
        # resized (weights UP_2_TO_4): [1,0], [.75,.25], [.25,.75], [0,1]
        # re-normalised: [1,0], [3,1]/sqrt10, [1,3]/sqrt10, [0,1]
        r10 = 1.0 / math.sqrt(10.0)
        expected = [
            [1.0, 3 * r10, 1 * r10, 0.0],
            [3 * r10, 1.0, 0.6, 1 * r10],
            [1 * r10, 0.6, 1.0, 3 * r10],
            [0.0, 1 * r10, 3 * r10, 1.0],
        ]
        got = teacher_similarity(tokens, grid=(1, 2), out_grid=(1, 4))
        _close(got[0], expected)

    def test_2x1_to_4x1_bilinear_transposed_grid(self):
        # same as above but along the height axis: catches h/w mix-ups
        tokens = torch.tensor([[[1.0, 0.0], [0.0, 5.0]]])
        got_h = teacher_similarity(tokens, grid=(2, 1), out_grid=(4, 1))
        got_w = teacher_similarity(tokens, grid=(1, 2), out_grid=(1, 4))
        _close(got_h, got_w)


class TestTeacherAttentionHand:
    def test_max_normalisation_no_resize(self):
        a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 0.0, 0.125]])
        got = teacher_attention_map(a, grid=(2, 2), out_grid=(2, 2))
        _close(got, [[0.25, 0.5, 0.75, 1.0], [1.0, 0.5, 0.0, 0.25]])
        assert got.dtype == torch.float32

    def test_no_max_normalisation(self):
        a = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
        got = teacher_attention_map(a, grid=(2, 2), out_grid=(2, 2), max_normalize=False)
        _close(got, [[0.1, 0.2, 0.3, 0.4]])

    def test_1x2_to_1x4(self):
        a = torch.tensor([[1.0, 3.0]])  # max-normalised: [1/3, 1]
        third = 1.0 / 3.0
        expected = [[third, 0.75 * third + 0.25, 0.25 * third + 0.75, 1.0]]
        _close(teacher_attention_map(a, grid=(1, 2), out_grid=(1, 4)), expected)
        expected_raw = [[1.0, 0.75 + 0.75, 0.25 + 2.25, 3.0]]
        _close(teacher_attention_map(a, grid=(1, 2), out_grid=(1, 4), max_normalize=False), expected_raw)

    def test_2x2_to_4x4(self):
        x = [[1.0, 2.0], [3.0, 4.0]]  # max 4 -> divide by 4
        expected = [
            [
                sum(UP_2_TO_4[i][p] * UP_2_TO_4[j][q] * x[p][q] / 4.0 for p in range(2) for q in range(2))
                for j in range(4)
            ]
            for i in range(4)
        ]
        got = teacher_attention_map(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), grid=(2, 2), out_grid=(4, 4))
        assert got.shape == (1, 16)
        _close(got.reshape(4, 4), expected)
        # spot checks written out fully
        assert got[0, 0].item() == pytest.approx(0.25)
        assert got[0, 15].item() == pytest.approx(1.0)
        # (1, 1): rows .75/.25 and cols .75/.25 -> (.5625*1 + .1875*2 + .1875*3 + .0625*4) / 4
        assert got[0, 5].item() == pytest.approx((0.5625 + 0.375 + 0.5625 + 0.25) / 4)

    def test_constant_map_resizes_to_constant(self):
        a = torch.full((2, 9), 0.07)
        got = teacher_attention_map(a, grid=(3, 3), out_grid=(5, 6))
        _close(got, torch.ones(2, 30))
        got_raw = teacher_attention_map(a, grid=(3, 3), out_grid=(5, 6), max_normalize=False)
        _close(got_raw, torch.full((2, 30), 0.07))


# ---------------------------------------------------------------------------------------
# 2. Equivalence with the original formulas (B=1, normalize="l2")
# ---------------------------------------------------------------------------------------


class TestReferenceEquivalence:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_spatial(self, seed):
        g = _gen(seed)
        student = torch.randn(1, 16, 8, generator=g)
        target = teacher_similarity(torch.randn(1, 16, 5, generator=g), (4, 4), (4, 4))
        target_ref = torch.rand(16, 16, generator=g) * 2 - 1
        _close(spatial_alignment_loss(student, target), ref_spatial(student[0], target[0]))
        _close(spatial_alignment_loss(student, target_ref[None]), ref_spatial(student[0], target_ref))

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_attention_l2(self, seed):
        g = _gen(seed)
        s = torch.softmax(torch.randn(1, 24, generator=g), dim=-1)
        t = torch.rand(1, 24, generator=g) + 0.01
        _close(attention_distillation_loss(s, t, normalize="l2"), ref_attention_l2(s[0], t[0]))

    @pytest.mark.parametrize("seed", [0, 1])
    def test_attention_probability(self, seed):
        g = _gen(seed)
        s = torch.softmax(torch.randn(1, 24, generator=g), dim=-1)
        t = torch.rand(1, 24, generator=g) + 0.01
        _close(attention_distillation_loss(s, t, normalize="probability"), ref_attention_probability(s[0], t[0]))

    @pytest.mark.parametrize(
        "grid,out_grid",
        [((4, 4), (4, 4)), ((2, 3), (3, 5)), ((3, 3), (6, 6)), ((5, 4), (3, 2)), ((2, 2), (7, 3))],
    )
    def test_teacher_similarity(self, grid, out_grid):
        g = _gen(grid[0] * 10 + out_grid[1])
        tokens = torch.randn(1, grid[0] * grid[1], 6, generator=g)
        got = teacher_similarity(tokens, grid, out_grid)
        n = out_grid[0] * out_grid[1]
        assert got.shape == (1, n, n)
        _close(got[0], ref_teacher_similarity(tokens[0], grid, out_grid))

    @pytest.mark.parametrize(
        "grid,out_grid",
        [((4, 4), (4, 4)), ((2, 3), (3, 5)), ((3, 3), (6, 6)), ((5, 4), (3, 2))],
    )
    @pytest.mark.parametrize("max_normalize", [True, False])
    def test_teacher_attention(self, grid, out_grid, max_normalize):
        g = _gen(grid[1] * 10 + out_grid[0])
        a = torch.softmax(torch.randn(1, grid[0] * grid[1], generator=g), dim=-1)
        got = teacher_attention_map(a, grid, out_grid, max_normalize=max_normalize)
        assert got.shape == (1, out_grid[0] * out_grid[1])
        _close(got[0], ref_teacher_attention(a[0], grid, out_grid, max_normalize))

    def test_pipeline_teacher_to_loss(self):
        """Teacher tokens on a 3x3 grid, student on 4x4: both functions chained equal the reference chain."""
        g = _gen(7)
        tokens = torch.randn(1, 9, 6, generator=g)
        student = torch.randn(1, 16, 10, generator=g)
        target = teacher_similarity(tokens, (3, 3), (4, 4))
        _close(
            spatial_alignment_loss(student, target),
            ref_spatial(student[0], ref_teacher_similarity(tokens[0], (3, 3), (4, 4))),
        )


# ---------------------------------------------------------------------------------------
# 3. Batch = mean of per-sample values
# ---------------------------------------------------------------------------------------


class TestBatchMean:
    def test_spatial(self):
        g = _gen(11)
        student = torch.randn(4, 9, 5, generator=g)
        target = torch.rand(4, 9, 9, generator=g) * 2 - 1
        per = [spatial_alignment_loss(student[i : i + 1], target[i : i + 1]) for i in range(4)]
        _close(spatial_alignment_loss(student, target), torch.stack(per).mean())
        # and against the reference formula per sample
        ref = torch.stack([ref_spatial(student[i], target[i]) for i in range(4)]).mean()
        _close(spatial_alignment_loss(student, target), ref)

    def test_spatial_weighted(self):
        g = _gen(12)
        student = torch.randn(3, 6, 4, generator=g)
        target = torch.rand(3, 6, 6, generator=g)
        w = torch.rand(3, 6, generator=g)
        per = [spatial_alignment_loss(student[i : i + 1], target[i : i + 1], w[i : i + 1]) for i in range(3)]
        _close(spatial_alignment_loss(student, target, w), torch.stack(per).mean())

    @pytest.mark.parametrize("normalize", ["l2", "probability"])
    def test_attention(self, normalize):
        g = _gen(13)
        s = torch.rand(5, 12, generator=g) + 1e-3
        t = torch.rand(5, 12, generator=g) + 1e-3
        per = [attention_distillation_loss(s[i : i + 1], t[i : i + 1], normalize=normalize) for i in range(5)]
        _close(attention_distillation_loss(s, t, normalize=normalize), torch.stack(per).mean())
        ref_fn = ref_attention_l2 if normalize == "l2" else ref_attention_probability
        _close(
            attention_distillation_loss(s, t, normalize=normalize),
            torch.stack([ref_fn(s[i], t[i]) for i in range(5)]).mean(),
        )

    def test_teacher_similarity_per_sample(self):
        g = _gen(14)
        tokens = torch.randn(3, 6, 4, generator=g)
        got = teacher_similarity(tokens, (2, 3), (4, 4))
        for i in range(3):
            _close(got[i], teacher_similarity(tokens[i : i + 1], (2, 3), (4, 4))[0])
            _close(got[i], ref_teacher_similarity(tokens[i], (2, 3), (4, 4)))

    @pytest.mark.parametrize("max_normalize", [True, False])
    def test_teacher_attention_per_sample(self, max_normalize):
        g = _gen(15)
        a = torch.rand(3, 6, generator=g)
        a[1] *= 10  # different maxima per sample
        got = teacher_attention_map(a, (2, 3), (4, 4), max_normalize=max_normalize)
        for i in range(3):
            _close(got[i], teacher_attention_map(a[i : i + 1], (2, 3), (4, 4), max_normalize=max_normalize)[0])
            _close(got[i], ref_teacher_attention(a[i], (2, 3), (4, 4), max_normalize))


# ---------------------------------------------------------------------------------------
# 4. bf16 inputs with zeros: finite values and finite gradients
# ---------------------------------------------------------------------------------------


def _bf16_attention_cases():
    # (student, teacher) pairs as bf16 [B, N]
    return {
        "student_exact_zeros": (
            torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.25, 0.0, 0.75, 0.0]]),
            torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]),
        ),
        "student_all_zero": (
            torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]),
            torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]),
        ),
        "teacher_zeros": (
            torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]),
            torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        ),
        "both_zero": (torch.zeros(2, 4), torch.zeros(2, 4)),
        "zeros_aligned": (
            torch.tensor([[0.0, 0.5, 0.5, 0.0]]),
            torch.tensor([[0.0, 0.5, 0.5, 0.0]]),
        ),
        "tiny_bf16_values": (
            torch.tensor([[1e-30, 1.0, 1e-38, 0.0]]),
            torch.tensor([[1.0, 1e-30, 0.0, 1.0]]),
        ),
    }


class TestBf16Zeros:
    @pytest.mark.parametrize("normalize", ["l2", "probability"])
    @pytest.mark.parametrize("case", list(_bf16_attention_cases()))
    def test_attention_finite(self, normalize, case):
        s, t = _bf16_attention_cases()[case]
        s = s.to(torch.bfloat16).requires_grad_(True)
        t = t.to(torch.bfloat16)
        loss = attention_distillation_loss(s, t, normalize=normalize)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss), f"{case}/{normalize}: loss {loss}"
        loss.backward()
        assert s.grad is not None
        assert torch.isfinite(s.grad.float()).all(), f"{case}/{normalize}: grad {s.grad}"

    def test_attention_zeros_aligned_probability_is_zero(self):
        s = torch.tensor([[0.0, 0.5, 0.5, 0.0]], dtype=torch.bfloat16)
        _close(attention_distillation_loss(s, s.clone(), normalize="probability"), 0.0)

    def test_attention_student_zero_where_teacher_positive_is_large_but_finite(self):
        s = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
        t = torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16)
        loss = attention_distillation_loss(s, t, normalize="probability")
        assert torch.isfinite(loss)
        assert loss.item() > 1.0  # 0.5*log(0.5/floor) + 0.5*log(0.5): clearly penalised

    def test_spatial_finite(self):
        student = torch.randn(2, 4, 3, generator=_gen(21))
        student[0, 1] = 0.0  # an all-zero visual state
        student[1] = 0.0  # an all-zero sample
        student = student.to(torch.bfloat16).requires_grad_(True)
        target = torch.zeros(2, 4, 4, dtype=torch.bfloat16)
        target[0, 0, 0] = 1.0
        weights = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
        for w in (None, weights):
            if student.grad is not None:
                student.grad = None
            loss = spatial_alignment_loss(student, target, w)
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss)
            loss.backward()
            assert torch.isfinite(student.grad.float()).all()

    def test_spatial_bf16_matches_float32_of_same_values(self):
        g = _gen(22)
        student = torch.randn(2, 9, 16, generator=g).to(torch.bfloat16)
        target = (torch.rand(2, 9, 9, generator=g) * 2 - 1).to(torch.bfloat16)
        _close(spatial_alignment_loss(student, target), spatial_alignment_loss(student.float(), target.float()))

    def test_teacher_targets_bf16_with_zeros(self):
        tokens = torch.randn(2, 4, 3, generator=_gen(23))
        tokens[0, 2] = 0.0
        tokens[1] = 0.0
        tokens = tokens.to(torch.bfloat16)
        for out_grid in ((2, 2), (3, 3)):
            sim = teacher_similarity(tokens, (2, 2), out_grid)
            assert sim.dtype == torch.float32
            assert torch.isfinite(sim).all()
        attn = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.25]], dtype=torch.bfloat16)
        for out_grid in ((2, 2), (3, 3)):
            m = teacher_attention_map(attn, (2, 2), out_grid)
            assert m.dtype == torch.float32
            assert torch.isfinite(m).all()
        _close(teacher_attention_map(attn, (2, 2), (2, 2)), [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.5]])


# ---------------------------------------------------------------------------------------
# 5. Shape / rank / option validation
# ---------------------------------------------------------------------------------------


class TestValidation:
    def test_spatial_target_shape_mismatch_names_both_shapes(self):
        with pytest.raises(ValueError) as info:
            spatial_alignment_loss(torch.randn(2, 4, 3), torch.randn(2, 5, 5))
        assert "(2, 4, 4)" in str(info.value)
        assert "(2, 5, 5)" in str(info.value)

    def test_spatial_target_batch_mismatch(self):
        with pytest.raises(ValueError) as info:
            spatial_alignment_loss(torch.randn(2, 4, 3), torch.randn(3, 4, 4))
        assert "(2, 4, 4)" in str(info.value)
        assert "(3, 4, 4)" in str(info.value)

    def test_spatial_target_wrong_rank(self):
        with pytest.raises(ValueError):
            spatial_alignment_loss(torch.randn(1, 4, 3), torch.randn(4, 4))

    def test_spatial_weights_shape_mismatch_names_both_shapes(self):
        with pytest.raises(ValueError) as info:
            spatial_alignment_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 4), torch.ones(2, 5))
        assert "(2, 4)" in str(info.value)
        assert "(2, 5)" in str(info.value)

    def test_spatial_weights_wrong_rank(self):
        with pytest.raises(ValueError):
            spatial_alignment_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 4), torch.ones(2, 4, 1))

    @pytest.mark.parametrize("shape", [(4, 3), (1, 2, 4, 3), (4,)])
    def test_spatial_student_wrong_rank(self, shape):
        with pytest.raises(ValueError):
            spatial_alignment_loss(torch.randn(*shape), torch.randn(1, 4, 4))

    def test_attention_shape_mismatch_names_both_shapes(self):
        with pytest.raises(ValueError) as info:
            attention_distillation_loss(torch.rand(2, 4), torch.rand(2, 5))
        assert "(2, 4)" in str(info.value)
        assert "(2, 5)" in str(info.value)

    @pytest.mark.parametrize("normalize", ["l2", "probability"])
    @pytest.mark.parametrize("shape", [(4,), (1, 2, 4)])
    def test_attention_wrong_rank(self, shape, normalize):
        with pytest.raises(ValueError):
            attention_distillation_loss(torch.rand(*shape), torch.rand(*shape), normalize=normalize)

    @pytest.mark.parametrize("normalize", ["L2", "softmax", "", None, "prob"])
    def test_attention_unknown_normalize(self, normalize):
        with pytest.raises(ValueError):
            attention_distillation_loss(torch.rand(1, 4), torch.rand(1, 4), normalize=normalize)

    def test_teacher_similarity_grid_mismatch_names_shape_and_grid(self):
        with pytest.raises(ValueError) as info:
            teacher_similarity(torch.randn(2, 4, 3), grid=(3, 3), out_grid=(3, 3))
        assert "(2, 4, 3)" in str(info.value)
        assert "(3, 3)" in str(info.value)

    @pytest.mark.parametrize("shape", [(4, 3), (1, 1, 4, 3)])
    def test_teacher_similarity_wrong_rank(self, shape):
        with pytest.raises(ValueError):
            teacher_similarity(torch.randn(*shape), grid=(2, 2), out_grid=(2, 2))

    def test_teacher_attention_grid_mismatch_names_shape_and_grid(self):
        with pytest.raises(ValueError) as info:
            teacher_attention_map(torch.rand(2, 4), grid=(3, 3), out_grid=(3, 3))
        assert "(2, 4)" in str(info.value)
        assert "(3, 3)" in str(info.value)

    @pytest.mark.parametrize("shape", [(4,), (1, 4, 1)])
    def test_teacher_attention_wrong_rank(self, shape):
        with pytest.raises(ValueError):
            teacher_attention_map(torch.rand(*shape), grid=(2, 2), out_grid=(2, 2))


# ---------------------------------------------------------------------------------------
# 6. Token weights
# ---------------------------------------------------------------------------------------


def _manual_weighted(student: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> float:
    """Per sample: mean over all N*N entries of w_i w_j (G_ij - T_ij)^2; then batch mean (loops)."""
    total = 0.0
    batch, n, _ = student.shape
    for b in range(batch):
        normed = [student[b, i] / student[b, i].norm() for i in range(n)]
        acc = 0.0
        for i in range(n):
            for j in range(n):
                gij = float(torch.dot(normed[i], normed[j]))
                acc += float(weights[b, i]) * float(weights[b, j]) * (gij - float(target[b, i, j])) ** 2
        total += acc / (n * n)
    return total / batch


class TestTokenWeights:
    def test_all_ones_equal_unweighted(self):
        g = _gen(31)
        student = torch.randn(3, 7, 5, generator=g)
        target = torch.rand(3, 7, 7, generator=g)
        _close(
            spatial_alignment_loss(student, target, torch.ones(3, 7)),
            spatial_alignment_loss(student, target),
        )
        # bf16 ones too
        _close(
            spatial_alignment_loss(student, target, torch.ones(3, 7, dtype=torch.bfloat16)),
            spatial_alignment_loss(student, target),
        )

    def test_general_weights_match_manual(self):
        g = _gen(32)
        student = torch.randn(2, 5, 4, generator=g)
        target = torch.rand(2, 5, 5, generator=g) * 2 - 1
        w = torch.rand(2, 5, generator=g) * 2
        _close(spatial_alignment_loss(student, target, w), _manual_weighted(student, target, w), atol=1e-5)

    @pytest.mark.parametrize("drop", [0, 2, 4])
    def test_zero_weight_removes_row_and_column(self, drop):
        g = _gen(33 + drop)
        n = 5
        student = torch.randn(2, n, 4, generator=g)
        target = torch.rand(2, n, n, generator=g) * 2 - 1
        w = torch.ones(2, n)
        w[0, drop] = 0.0
        got = spatial_alignment_loss(student, target, w)
        _close(got, _manual_weighted(student, target, w), atol=1e-5)

        # sample 0: only the (N-1)x(N-1) sub-block without `drop` counts, still divided by N*N
        keep = [k for k in range(n) if k != drop]
        s0 = F.normalize(student[0], dim=-1)
        err0 = (s0 @ s0.T - target[0])[keep][:, keep].pow(2).sum() / (n * n)
        s1 = F.normalize(student[1], dim=-1)
        err1 = (s1 @ s1.T - target[1]).pow(2).mean()
        _close(got, (err0 + err1) / 2)

        # changing the dropped token's state or its target row/column changes nothing
        student2 = student.clone()
        student2[0, drop] = torch.randn(4, generator=g) * 10
        target2 = target.clone()
        target2[0, drop, :] = 7.0
        target2[0, :, drop] = -3.0
        _close(spatial_alignment_loss(student2, target2, w), got)

        # and the dropped token receives no gradient
        student3 = student.clone().requires_grad_(True)
        spatial_alignment_loss(student3, target, w).backward()
        assert torch.all(student3.grad[0, drop] == 0)
        assert student3.grad[0, (drop + 1) % n].abs().sum() > 0
        assert student3.grad[1, drop].abs().sum() > 0


# ---------------------------------------------------------------------------------------
# 7. Properties and differentiability
# ---------------------------------------------------------------------------------------


class TestProperties:
    def test_spatial_zero_when_gram_matches_teacher_similarity(self):
        g = _gen(41)
        tokens = torch.randn(2, 12, 6, generator=g)
        target = teacher_similarity(tokens, (3, 4), (3, 4))
        # any positive rescaling of each token leaves the Gram matrix unchanged
        scale = torch.rand(2, 12, 1, generator=g) * 5 + 0.1
        loss = spatial_alignment_loss(tokens * scale, target)
        assert loss.item() == pytest.approx(0.0, abs=1e-10)

    def test_spatial_zero_for_self_gram(self):
        student = torch.randn(1, 6, 3, generator=_gen(42))
        s_n = F.normalize(student[0], dim=-1)
        assert spatial_alignment_loss(student, (s_n @ s_n.T)[None]).item() == pytest.approx(0.0, abs=1e-10)

    def test_spatial_positive_otherwise(self):
        g = _gen(43)
        tokens = torch.randn(1, 9, 6, generator=g)
        target = teacher_similarity(tokens, (3, 3), (3, 3))
        assert spatial_alignment_loss(torch.randn(1, 9, 6, generator=g), target).item() > 0

    def test_probability_zero_for_identical_and_positive_otherwise(self):
        g = _gen(44)
        a = torch.rand(3, 10, generator=g) + 0.01
        assert attention_distillation_loss(a, a.clone(), normalize="probability").item() == pytest.approx(0.0, abs=1e-7)
        # scale invariance: sum normalisation makes c*a identical to a
        assert attention_distillation_loss(a * 3.0, a, normalize="probability").item() == pytest.approx(0.0, abs=1e-6)
        b = torch.rand(3, 10, generator=g) + 0.01
        assert attention_distillation_loss(a, b, normalize="probability").item() > 0
        # a single differing sample is enough for a positive batch loss
        c = a.clone()
        c[1, 0] += 0.5
        assert attention_distillation_loss(c, a, normalize="probability").item() > 0

    def test_l2_zero_for_identical(self):
        a = torch.rand(2, 10, generator=_gen(45)) + 0.01
        assert attention_distillation_loss(a, a.clone(), normalize="l2").item() == pytest.approx(0.0, abs=1e-7)

    def test_probability_nonnegative_random(self):
        g = _gen(46)
        for _ in range(5):
            s = torch.rand(4, 16, generator=g)
            t = torch.rand(4, 16, generator=g)
            assert attention_distillation_loss(s, t, normalize="probability").item() >= -1e-7

    def test_spatial_gradient_matches_reference(self):
        g = _gen(47)
        student = torch.randn(2, 6, 4, generator=g, requires_grad=True)
        target = torch.rand(2, 6, 6, generator=g)
        w = torch.rand(2, 6, generator=g)
        loss = spatial_alignment_loss(student, target)
        assert loss.requires_grad and loss.dim() == 0
        (grad,) = torch.autograd.grad(loss, student)
        ref_student = student.detach().clone().requires_grad_(True)
        ref = torch.stack([ref_spatial(ref_student[i], target[i]) for i in range(2)]).mean()
        (ref_grad,) = torch.autograd.grad(ref, ref_student)
        _close(grad, ref_grad)
        assert grad.abs().sum() > 0
        # weighted path is differentiable too
        (wgrad,) = torch.autograd.grad(spatial_alignment_loss(student, target, w), student)
        assert torch.isfinite(wgrad).all() and wgrad.abs().sum() > 0

    @pytest.mark.parametrize("normalize", ["l2", "probability"])
    def test_attention_gradient_matches_reference(self, normalize):
        g = _gen(48)
        s = (torch.rand(3, 8, generator=g) + 0.05).requires_grad_(True)
        t = torch.rand(3, 8, generator=g) + 0.05
        loss = attention_distillation_loss(s, t, normalize=normalize)
        assert loss.requires_grad and loss.dim() == 0
        (grad,) = torch.autograd.grad(loss, s)
        ref_s = s.detach().clone().requires_grad_(True)
        ref_fn = ref_attention_l2 if normalize == "l2" else ref_attention_probability
        ref = torch.stack([ref_fn(ref_s[i], t[i]) for i in range(3)]).mean()
        (ref_grad,) = torch.autograd.grad(ref, ref_s)
        _close(grad, ref_grad, atol=1e-5)
        assert grad.abs().sum() > 0

    def test_attention_gradient_finite_difference(self):
        g = _gen(49)
        s = torch.rand(1, 6, generator=g, dtype=torch.float32) + 0.1
        t = torch.rand(1, 6, generator=g) + 0.1
        s_req = s.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(attention_distillation_loss(s_req, t), s_req)
        eps = 1e-3
        for i in range(6):
            plus, minus = s.clone(), s.clone()
            plus[0, i] += eps
            minus[0, i] -= eps
            fd = (attention_distillation_loss(plus, t) - attention_distillation_loss(minus, t)) / (2 * eps)
            assert grad[0, i].item() == pytest.approx(fd.item(), abs=2e-3)

    def test_teacher_targets_differentiable(self):
        g = _gen(50)
        tokens = torch.randn(1, 4, 3, generator=g, requires_grad=True)
        (grad,) = torch.autograd.grad(teacher_similarity(tokens, (2, 2), (3, 3)).sum(), tokens)
        assert torch.isfinite(grad).all()
        attn = torch.rand(1, 4, generator=g, requires_grad=True)
        (agrad,) = torch.autograd.grad(teacher_attention_map(attn, (2, 2), (3, 3)).pow(2).sum(), attn)
        assert torch.isfinite(agrad).all()

    def test_inputs_not_modified(self):
        g = _gen(51)
        s = torch.rand(2, 5, generator=g)
        t = torch.rand(2, 5, generator=g)
        s0, t0 = s.clone(), t.clone()
        attention_distillation_loss(s, t, normalize="l2")
        attention_distillation_loss(s, t, normalize="probability")
        assert torch.equal(s, s0) and torch.equal(t, t0)
        v = torch.randn(2, 5, 3, generator=g)
        v0 = v.clone()
        spatial_alignment_loss(v, torch.rand(2, 5, 5, generator=g), torch.rand(2, 5, generator=g))
        assert torch.equal(v, v0)
