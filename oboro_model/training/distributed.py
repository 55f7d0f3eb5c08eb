"""Data-parallel training (DDP through `accelerate`): the Trainer's distributed hooks on an
`accelerate.Accelerator`. Under `accelerate launch` every process runs scripts/oboro-train (cli.py)
as one rank, each on its slice of every global batch (global batch = batch_size x processes x
grad_accum). Only the main process writes files. DDP only: FSDP is not supported."""
from __future__ import annotations

from .trainer import LocalProcess


# ---- distributed hooks --------------------------------------------------------------------------
class AccelerateProcess(LocalProcess):
    """Trainer hooks on an `accelerate.Accelerator` (DDP under `accelerate launch`)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def mean(self, value):
        return self.accelerator.reduce(value, "mean") if self.world_size > 1 else value

    def barrier(self):
        self.accelerator.wait_for_everyone()
