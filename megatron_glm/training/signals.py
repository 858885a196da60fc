"""Preemption: SIGTERM or SIGUSR1 (SLURM's ``--signal``) asks for a checkpoint at the next step boundary.

The handler only sets a flag; the training loop asks ``requested()`` once per step, which agrees on the
flag across all ranks (one tiny all-reduce), so every rank saves the same step and exits 0 together. On GPUs
the agreed flag is read one step later (``HostScalars``): reading it at once would make the host wait for the
GPU to finish the step before it could queue the next one.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_glm.log import get_logger

logger = get_logger("signals")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """A context in which SIGTERM and SIGUSR1 set a flag instead of ending the process.

    ``requested()``, called once per step on every rank, is true everywhere as soon as any rank got a
    signal, so all ranks save the same step and exit 0. The previous handlers come back on exit.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous = {}
        self._pending = None  # the last call's agreed flag, on its way to the host (GPUs)

    def __enter__(self) -> PreemptionHandler:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            logger.warning(
                "received %s: saving a checkpoint at the next step boundary, then exiting",
                signal.Signals(signum).name,
            )

    def requested(self) -> bool:
        """True on every rank once any rank received a preemption signal: at once on CPUs, one call later on
        GPUs (each call sends this step's flags and reads the last call's, long since reduced)."""
        from megatron_glm.training.metrics import HostScalars

        # Filled on the device: torch.tensor([...], device=) would copy from pageable host memory, a copy that
        # waits for the GPU to finish everything queued (the whole step) before it returns.
        flag = torch.full((1,), int(self.received is not None), dtype=torch.int32, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = HostScalars([flag])
        if self.device.type != "cuda":
            return agreed.values()[0] > 0
        previous, self._pending = self._pending, agreed
        return previous is not None and previous.values()[0] > 0
