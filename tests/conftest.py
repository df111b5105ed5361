import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cfg():
    from gd_train.config import load_config

    return load_config("configs/model/tiny.yaml")


def randomize_trainable(student, seed: int = 0, std: float = 0.3) -> None:
    """Give the LoRA and c_f weights non-zero values so that adapter/mask/cond mistakes show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def student(tiny_cfg):
    from gd_train.model.student import GreedyDistillStudent

    torch.manual_seed(0)
    s = GreedyDistillStudent.from_config(tiny_cfg)
    randomize_trainable(s)
    return s
