"""Recording the reads of tensor values on the host: on a GPU each one waits for the device to finish
everything queued before it, so a training step that makes none lets the host queue the next step meanwhile.
On CPUs the same code makes the same reads, so the tests find them without a GPU."""

from __future__ import annotations

import contextlib
import traceback

import torch

_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_reads_recorded(log: list[str]):
    """Appends ``"<method> at <file>:<line>"`` to ``log`` for every tensor value read inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def recording(name):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            log.append(f"{name} at {caller.filename}:{caller.lineno}")
            return saved[name](self, *args, **kwargs)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
