"""One rank of `python -m torch.distributed.run ... tests/reload_worker.py RUN_DIR OUT [KEY=VALUE ...]`: the
real trainer resumes RUN_DIR on this launch's world size (and ZeRO stage, from the overrides) and, without
training, saves what it loaded as a checkpoint of OUT (a new run folder). The test compares OUT's
per-parameter state with RUN_DIR's: whatever the partitioning, loading then saving must give the saved
tensors back bit for bit."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from gd_train import checkpoint, distributed
from gd_train.train.plan import CONFIG_FILE, load_run_config
from gd_train.train.trainer import Trainer


def main(run_dir: str, out: str, *overrides: str) -> None:
    cfg = load_run_config(Path(run_dir), None, None, True, list(overrides))
    trainer = Trainer(cfg, Path(run_dir), resume=True)
    folder = checkpoint.resolve(run_dir)
    manifest = dataclasses.replace(checkpoint.Manifest.read(folder), world_size=distributed.world_size(),
                                   zero_stage=int(cfg.train.zero_stage), files={})
    if distributed.rank() == 0:  # OUT is a run folder: the next reload can start from it
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / CONFIG_FILE).write_text((Path(run_dir) / CONFIG_FILE).read_text())
    checkpoint.save(trainer.engine, trainer.student, out, manifest, {"reader": trainer.reader.state_dict()},
                    keep_last=1, files={CONFIG_FILE: (folder / CONFIG_FILE).read_text()})


if __name__ == "__main__":
    main(*sys.argv[1:])
