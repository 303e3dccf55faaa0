"""Knowledge distillation: train a (compressed) student toward a trained teacher's predictions.

``Distillation`` wraps a task and changes only its training loss, to Hinton et al.'s mix of the task's own loss
and the teacher's softened distribution (AntMan, Zhao et al. 2019, pairs compression with it):

    loss = (1 - weight) * CE(student, targets) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per token, scaled like the task's loss (summed over the unrolled steps). The teacher runs in eval mode without
gradients and carries its own recurrent state from window to window, as the student does, so it predicts every
token from the same history; that state rides along with the student's in the trainer's carried state (and so
in mid-epoch checkpoints). Evaluation is the task's own: the student alone, on the task's metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional


@dataclass
class DistillConfig:
    weight: float = 0.5          # share of the teacher's soft targets in the loss (0: the task's loss only)
    temperature: float = 1.0     # softening of both distributions (Hinton's T); the soft term is scaled by T^2

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must lie in [0, 1], got {self.weight}")
        if not self.temperature > 0.0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


class Distillation:
    """``task`` with its training loss mixed with a teacher's soft targets; everything else is ``task``'s.

    ``teacher`` and the student share the model contract ``model(inputs, state, targets) -> (logits, loss,
    state)`` of ``tasks.lm.WordLM``. ``training_loss`` returns the task's own loss as a third element, so that the
    trainer reports the task's metric (train perplexity) rather than the mixed objective.
    """

    def __init__(self, task, teacher: nn.Module, config: DistillConfig | None = None) -> None:
        self.task, self.config = task, config if config is not None else DistillConfig()
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.metric = task.metric

    def num_train_batches(self) -> int:
        return self.task.num_train_batches()

    def train_batches(self):
        return self.task.train_batches()

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return self.task.evaluate(model, split)

    def training_loss(self, model: nn.Module, batch, state):
        inputs, targets = batch
        student_state, teacher_state = state if state is not None else (None, None)
        logits, task_loss, student_state = model(inputs, student_state, targets)
        with torch.no_grad():
            teacher_logits, _, teacher_state = self.teacher(inputs, teacher_state)
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"the teacher predicts {tuple(teacher_logits.shape)} logits where the student predicts "
                             f"{tuple(logits.shape)}: distil only from a teacher trained on the same task and data")
        soft = soft_target_loss(logits, teacher_logits, self.config.temperature)
        weight = self.config.weight
        loss = (1.0 - weight) * task_loss + weight * soft
        steps = inputs.shape[0]      # summed over the unrolled steps, as the task's own loss
        return loss * steps, (student_state, teacher_state), task_loss.detach() * steps


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``T^2 KL(softmax(teacher / T) || softmax(student / T))``; the last axis is the vocabulary.

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
    """
    vocabulary = logits.shape[-1]
    # in float32 even under bf16 autocast, which leaves log_softmax in bf16: the gradient is a difference of two
    # close distributions, and bf16's 8-bit mantissa would drown it
    student = functional.log_softmax(logits.reshape(-1, vocabulary).float() / temperature, dim=-1)
    teacher = functional.log_softmax(teacher_logits.reshape(-1, vocabulary).float() / temperature, dim=-1)
    return functional.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
