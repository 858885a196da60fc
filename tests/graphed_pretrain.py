"""glm-pretrain with ``training.cuda_graphs`` on a CPU: the graph primitives replaced by ``graph_stand_ins``, and
the refusal of CUDA graphs on a CPU lifted for this process only. At exit it prints how many stand-in replays
ran (``stand-in graph replays: N``), so a test can tell that the layers did run through the graphs."""

import dataclasses
import sys

from megatron_glm.cli.pretrain import main
from megatron_glm.training import trainer
from tests.graph_stand_ins import StandInGraph, install

install()
_refuse = trainer.refuse_gpu_only_settings


def _refuse_all_but_graphs(cfg, device):
    _refuse(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, cuda_graphs=False)), device)


trainer.refuse_gpu_only_settings = _refuse_all_but_graphs

if __name__ == "__main__":
    status = main()
    print(f"stand-in graph replays: {StandInGraph.replays}", file=sys.stderr)
    sys.exit(status)
