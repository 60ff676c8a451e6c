"""Shared fixtures: a tiny toy teacher trained for a few steps, built once per test session."""

from __future__ import annotations

import pytest
import torch

from senseflow.experiments.toy.teacher import train_teacher
from senseflow.families.toy.recipe import TeacherArch, TeacherTraining, TextArch, ToyTeacherConfig

TINY_TEACHER = ToyTeacherConfig(
    arch=TeacherArch(num_layers=1, num_attention_heads=2, attention_head_dim=8),
    text=TextArch(hidden_size=16, num_layers=1, num_heads=2),
    train=TeacherTraining(steps=3, batch_size=4, warmup_steps=1, log_every=1),
)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A pipeline-layout teacher folder from a 3-step training run of a tiny config."""
    torch.set_num_threads(1)
    return train_teacher(TINY_TEACHER, tmp_path_factory.mktemp("tiny_teacher"), progress=False)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(family, variant)``: a tiny random teacher of the real classes, written once."""
    from senseflow.families.tiny import write_tiny_teacher

    made = {}

    def get(family: str, variant: str = "a"):
        if (family, variant) not in made:
            root = tmp_path_factory.mktemp(f"tiny_{family}_{variant}")
            made[family, variant] = write_tiny_teacher(root / "teacher", family, variant)
        return made[family, variant]

    return get
