"""glm-pretrain in which one rank raises mid-training: rank $CRASH_RANK, in its training step $CRASH_STEP.

The tests of launch failures run it under torchrun, mpirun and srun: the other ranks then wait in a
collective that never completes, and the launcher must end them (not a 30-minute collective timeout).
"""

import os
import sys

from megatron_glm.cli.pretrain import main
from megatron_glm.training.distributed import detect_launch
from megatron_glm.training.engine import TrainingEngine

_train_step = TrainingEngine.train_step
_steps = 0


def _crashing_train_step(self, batches):
    global _steps
    _steps += 1
    if detect_launch().rank == int(os.environ["CRASH_RANK"]) and _steps == int(os.environ["CRASH_STEP"]):
        raise RuntimeError(f"injected failure at step {_steps}")
    return _train_step(self, batches)


TrainingEngine.train_step = _crashing_train_step

if __name__ == "__main__":
    sys.exit(main())
