import os

# `make test` runs on pytest-xdist workers (Makefile). A worker's in-process torch and everything it
# starts (gd-train's ranks, gd-generate, Ray actors, `make demo`: they inherit the variable) get
# cores / workers threads, not every core each: two workers' OpenMP pools must not oversubscribe the
# two cores. Set before torch is imported; an OMP_NUM_THREADS given by the caller wins; serial runs
# (PYTEST_WORKERS=1) are unchanged.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                      // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under xdist (`make test`: --dist loadfile --no-loadscope-reorder) every module is one unit of work,
# its module fixtures built once, on one worker, and the units are handed out in collection order. These
# go first, longest first (serial seconds on the 2-core machine), so that no long one is left running
# alone at the end; the rest keep their order.
SLOW_FIRST = (
    "test_demo.py",  # ~280: a fresh clone's install, `make demo` twice
    "test_slurm_two_nodes.py", "test_slurm_gen_teacher.py",  # ~150 together: they take turns on one cluster
    "test_train_stage1.py",  # ~115
    "test_elastic.py",  # ~115
    "test_gen_teacher.py",  # ~100
    "test_checkpoint.py",  # ~85
    "test_ray_two_nodes.py",  # ~75
    "test_ray_stop.py",  # ~70
    "test_slurm_stage1.py",  # ~70
    "test_generate.py",  # ~60
    "test_train_stage2.py",  # ~60
)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker; a serial run keeps the collection order
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


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
