"""The MedAlign training objective: ``L = L_LM + lambda_align * L_spatial + lambda_attn * L_attn``.

Loss weights live in :class:`DistillSettings` (config), the way torchdistill keeps a
weighted sum of named terms; the student quantities come from a
:class:`~medalign_platform.core.student.DistillationTap` at layer ``L``, and the teacher targets
are formed on the fly from native-grid teacher outputs (patch tokens and CLS attention), so
only ~0.3 MiB per image is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from .losses import (
    attention_distillation_loss,
    spatial_alignment_loss,
    teacher_attention_map,
    teacher_similarity,
)
from .student import DistillationTap, SteerSettings, attach_steer


class TeacherTargets(Protocol):
    """Native-grid teacher outputs for a batch (e.g. ``teacher.TeacherOutputs``).

    An optional ``prompt_attention`` ``[B, h*w]`` (question-conditioned map) replaces
    ``cls_attention`` as the attention target when present and not None.
    """

    patch_tokens: torch.Tensor  # [B, h*w, D_t]
    cls_attention: torch.Tensor  # [B, h*w]
    grid: tuple[int, int]


TOKEN_WEIGHTS = ("none", "teacher_attention")


def teacher_attention_source(teacher: TeacherTargets) -> torch.Tensor:
    """``prompt_attention`` when the targets carry one, else ``cls_attention`` (``[B, h*w]``)."""
    prompt = getattr(teacher, "prompt_attention", None)
    return prompt if prompt is not None else teacher.cls_attention


def attention_token_weights(attention: torch.Tensor) -> torch.Tensor:
    """Per-visual-token weights from a teacher attention map: ``w = a / mean(a)`` per sample.

    Normalising to mean 1 keeps the weighted spatial loss on the scale of the unweighted one
    and makes it independent of any constant rescaling of ``a`` (such as the max-division).

    Args:
        attention: ``[B, N]`` non-negative maps on the student grid.

    Returns:
        ``[B, N]`` float32 weights with mean 1 per sample (detached: a target, not a path
        for gradients).
    """
    attention = attention.detach().float().clamp_min(0)
    return attention / attention.mean(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class DistillSettings:
    """Where and how strongly MedAlign distils the teacher into the student."""

    layer: int = field(default=20, metadata={"help": "Distillation layer L, 0-based HF decoder index, 1..depth-1."})
    lambda_align: float = field(default=1.0, metadata={"help": "Weight of the spatial-aware alignment loss (>= 0)."})
    lambda_attn: float = field(default=0.06, metadata={"help": "Weight of the attention-aware distillation loss (>= 0)."})
    attention_normalize: Literal["l2", "probability"] = field(
        default="probability",
        metadata={"help": "probability: proper KL; l2: the original code's L2-normalised variant."},
    )
    teacher_max_normalize: bool = field(
        default=True,
        metadata={"help": "Display only: divide the teacher attention map by its max in TensorBoard panels. "
                  "Neither loss can change with it (probability and L2 normalisation, and the mean-1 token "
                  "weights, all remove a constant scale), so it is not a search-space key."},
    )
    token_weights: str = field(
        default="none",
        metadata={"help": "none | teacher_attention: weight entry (i, j) of the spatial loss by w_i w_j with "
                  "w = teacher attention / its mean (on the student grid)."},
    )
    steer: SteerSettings = field(default_factory=SteerSettings)

    def __post_init__(self) -> None:
        if isinstance(self.steer, dict):
            self.steer = SteerSettings(**self.steer)
        for name in ("lambda_align", "lambda_attn"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"distill.{name} must be >= 0, got {value}")
        if self.attention_normalize not in ("l2", "probability"):
            raise ValueError(f"distill.attention_normalize must be l2 or probability, got {self.attention_normalize!r}")
        if self.token_weights not in TOKEN_WEIGHTS:
            raise ValueError(f"distill.token_weights must be one of {list(TOKEN_WEIGHTS)}, got {self.token_weights!r}")


class MedAlignObjective:
    """Computes the MedAlign loss terms for a student batch and its teacher targets.

    Building the objective attaches the steer adapter (if configured) and the layer-L tap
    to ``model``; call :meth:`remove` to detach the hooks.

    Args:
        model: the peft-wrapped LLaVA-family student.
        settings: distillation layer, loss weights and steer adapter.

    Example:
        >>> objective = MedAlignObjective(model, DistillSettings(layer=2))
        >>> terms = objective(batch, teacher_outputs)
        >>> terms["loss"].backward()
    """

    def __init__(self, model: nn.Module, settings: DistillSettings):
        self.model = model
        self.settings = settings
        self.steer = attach_steer(model, settings.steer)
        self.tap = DistillationTap(
            model, settings.layer, steer=self.steer, capture_attention=settings.lambda_attn > 0
        )
        self.student_grid = self.tap.grid

    def remove(self) -> None:
        self.tap.remove()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA and steer parameters: everything the optimiser should update."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def targets(self, teacher: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher similarity ``[B, N, N]`` and attention ``[B, N]`` on the student's grid.

        The attention is the question-conditioned map when the targets carry one.
        """
        similarity = teacher_similarity(teacher.patch_tokens, teacher.grid, self.student_grid)
        attention = teacher_attention_map(
            teacher_attention_source(teacher), teacher.grid, self.student_grid,
            max_normalize=self.settings.teacher_max_normalize,
        )
        return similarity, attention

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        token_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Runs the student on ``batch`` and returns the loss and its terms.

        Args:
            batch: processor output with ``input_ids``, ``attention_mask``, ``pixel_values``
                and ``labels`` (``-100`` on prompt and padding).
            teacher: native-grid teacher targets for the batch's images; may be None only
                when both lambdas are 0.
            token_weights: optional ``[B, N]`` per-visual-token weights for the spatial loss;
                when None and ``distill.token_weights`` is ``teacher_attention`` they come from
                the teacher's attention map (:func:`attention_token_weights`).

        Returns:
            ``{"loss", "lm", "spatial", "attention"}``; the distillation terms are float32
            scalars (zero tensors when their weight is 0 and nothing was computed).
        """
        settings = self.settings
        output = self.model(**batch)
        lm = output.loss
        captured = self.tap.pop()
        zero = lm.new_zeros((), dtype=torch.float32)
        spatial = attention = zero
        if settings.lambda_align > 0 or settings.lambda_attn > 0:
            if teacher is None:
                raise ValueError("teacher targets are required when lambda_align or lambda_attn is > 0")
            similarity, teacher_attention = self.targets(teacher)
            if token_weights is None and settings.token_weights == "teacher_attention":
                token_weights = attention_token_weights(teacher_attention).to(lm.device)
            if settings.lambda_align > 0:
                spatial = spatial_alignment_loss(captured.visual_states, similarity.to(lm.device), token_weights)
            if settings.lambda_attn > 0:
                attention = attention_distillation_loss(
                    captured.attention, teacher_attention.to(lm.device), normalize=settings.attention_normalize
                )
        loss = lm + settings.lambda_align * spatial + settings.lambda_attn * attention
        return {"loss": loss, "lm": lm.detach(), "spatial": spatial.detach(), "attention": attention.detach()}
