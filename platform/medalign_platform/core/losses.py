"""MedAlign's two distillation losses and the teacher targets they compare against.

All four functions are batched: with ``B > 1`` each returns the mean of the per-sample
values, and with ``B == 1`` (``normalize="l2"`` for the attention loss) they reproduce the
original single-sample formulas of ../shared/method.md to float precision.

Everything is computed in float32 whatever the input dtype, because bf16 Gram matrices and
logarithms lose the small differences these losses are made of.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionNormalize = Literal["l2", "probability"]

# Smallest value allowed inside a log: a bf16 attention of exactly 0 must not give -inf.
_LOG_FLOOR = 1e-12


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, other_name: str) -> None:
    """Raises a ValueError naming both shapes when ``tensor`` is not ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {other_name} implies {tuple(expected)}; "
            "the student's visual grid (H*W tokens) and the teacher targets' out_grid must agree."
        )


def _check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def spatial_alignment_loss(
    student_visual: torch.Tensor,
    teacher_similarity: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spatial-aware visual alignment: MSE between cosine-similarity (Gram) matrices.

    Args:
        student_visual: ``[B, N, D]`` student hidden states of the visual span at layer L.
        teacher_similarity: ``[B, N, N]`` teacher cosine-similarity target
            (see :func:`teacher_similarity`).
        token_weights: optional ``[B, N]`` per-token weights ``w``; entry ``(i, j)`` of the
            squared error is weighted by ``w_i * w_j``. Weights of 1 give the plain MSE.

    Returns:
        Scalar: per sample, the mean over all ``N*N`` (weighted) squared errors; then the
        mean over the batch.
    """
    _check_rank("student_visual", student_visual, 3, "[B, N, D]")
    batch, tokens, _ = student_visual.shape
    _check_shape("teacher_similarity", teacher_similarity, (batch, tokens, tokens), "student_visual [B, N, D]")
    normed = F.normalize(student_visual.float(), dim=-1)
    gram = normed @ normed.transpose(1, 2)  # [B, N, N]
    squared_error = (gram - teacher_similarity.float()).pow(2)
    if token_weights is not None:
        _check_shape("token_weights", token_weights, (batch, tokens), "student_visual [B, N, D]")
        weights = token_weights.float()
        squared_error = squared_error * (weights[:, :, None] * weights[:, None, :])
    return squared_error.mean(dim=(1, 2)).mean()


def attention_distillation_loss(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    normalize: AttentionNormalize = "probability",
) -> torch.Tensor:
    """Attention-aware distillation: KL(teacher || student) over the visual tokens.

    Args:
        student_attention: ``[B, N]`` student text-to-image attention at layer L.
        teacher_attention: ``[B, N]`` teacher attention target
            (see :func:`teacher_attention_map`).
        normalize: ``"probability"`` rescales both vectors to sum to 1 and returns the
            proper KL divergence, averaged over the batch. ``"l2"`` reproduces the original
            code: both vectors are L2-normalised (so they are not distributions) and the
            per-sample value is ``sum_i t_i (log t_i - log s_i) / N``, i.e.
            ``kl_div(log(s), t, reduction="batchmean")`` on the 1-D vector.

    Returns:
        Scalar loss, the mean of the per-sample values.
    """
    _check_rank("student_attention", student_attention, 2, "[B, N]")
    _check_shape("teacher_attention", teacher_attention, tuple(student_attention.shape), "student_attention [B, N]")
    student = student_attention.float()
    teacher = teacher_attention.float()
    if normalize == "l2":
        student = F.normalize(student, dim=-1)
        teacher = F.normalize(teacher, dim=-1)
        scale = 1.0 / student.shape[-1]  # "batchmean" over a 1-D vector divides by N
    elif normalize == "probability":
        student = student / student.sum(dim=-1, keepdim=True).clamp_min(_LOG_FLOOR)
        teacher = teacher / teacher.sum(dim=-1, keepdim=True).clamp_min(_LOG_FLOOR)
        scale = 1.0
    else:
        raise ValueError(f"normalize must be 'l2' or 'probability', got {normalize!r}")
    log_student = student.clamp_min(_LOG_FLOOR).log()
    # kl_div treats target 0 as contributing 0 (xlogy), so teacher zeros are safe too.
    per_sample = F.kl_div(log_student, teacher, reduction="none").sum(dim=-1) * scale
    return per_sample.mean()


def _resize_grid(maps: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resizes ``[B, C, h, w]`` maps to ``out_grid`` (skipped when equal)."""
    if tuple(grid) == tuple(out_grid):
        return maps
    return F.interpolate(maps, size=tuple(out_grid), mode="bilinear", align_corners=False)


def _check_grid(name: str, tensor: torch.Tensor, grid: tuple[int, int]) -> None:
    if tensor.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but grid={tuple(grid)} implies "
            f"{grid[0] * grid[1]} patches in dim 1; pass the teacher's native patch grid."
        )


def teacher_similarity(
    patch_tokens: torch.Tensor,
    grid: tuple[int, int],
    out_grid: tuple[int, int],
) -> torch.Tensor:
    """Teacher cosine-similarity target on the student's visual grid.

    Args:
        patch_tokens: ``[B, h*w, D]`` teacher last-block patch tokens (CLS dropped).
        grid: the teacher's native patch grid ``(h, w)``.
        out_grid: the student's visual grid ``(H, W)``.

    Returns:
        ``[B, H*W, H*W]`` float32 Gram matrix of the L2-normalised, resized tokens.
    """
    _check_rank("patch_tokens", patch_tokens, 3, "[B, h*w, D]")
    _check_grid("patch_tokens", patch_tokens, grid)
    batch, _, dim = patch_tokens.shape
    tokens = F.normalize(patch_tokens.float(), dim=-1)
    maps = tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])  # [B, D, h, w]
    maps = _resize_grid(maps, grid, out_grid)
    tokens = F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)  # [B, H*W, D]
    return tokens @ tokens.transpose(1, 2)


def teacher_attention_map(
    cls_attention: torch.Tensor,
    grid: tuple[int, int],
    out_grid: tuple[int, int],
    max_normalize: bool = True,
) -> torch.Tensor:
    """Teacher attention target on the student's visual grid.

    Args:
        cls_attention: ``[B, h*w]`` head-averaged CLS-to-patch attention of the last block.
        grid: the teacher's native patch grid ``(h, w)``.
        out_grid: the student's visual grid ``(H, W)``.
        max_normalize: divide each map by its maximum before resizing (the main released
            variant; one variant skips it).

    Returns:
        ``[B, H*W]`` float32 attention map.
    """
    _check_rank("cls_attention", cls_attention, 2, "[B, h*w]")
    _check_grid("cls_attention", cls_attention, grid)
    attention = cls_attention.float()
    if max_normalize:
        attention = attention / attention.amax(dim=-1, keepdim=True).clamp_min(_LOG_FLOOR)
    maps = attention.reshape(-1, 1, grid[0], grid[1])
    return _resize_grid(maps, grid, out_grid).flatten(1)
