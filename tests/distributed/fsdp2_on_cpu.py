"""Run ``mm-align`` with accelerate's FSDP2 engine on CPU processes (gloo), for the tests.

accelerate routes FSDP only to accelerators (on a CPU it silently falls back to DDP, MULTI_CPU),
while torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo. This launcher, started under
``torch.distributed.run``, makes accelerate's state report FSDP with a version-2 plugin after it
has set up the gloo process group, so the trainer goes through accelerate's real FSDP2 preparation
(``fsdp2_prepare_model``), clipping and state-dict gathering. It is a test harness, not a way to
train: on GPUs use ``accelerate launch --config_file mm_align/configs/accelerate/fsdp.yaml``.
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _fsdp2_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)  # (re)reads the process state, which says MULTI_CPU, on every construction
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if getattr(self, "fsdp_plugin", None) is None:
        self.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
            # one FSDP unit per layer class named here (peft's LoRA Linear and the nn.Linear inside it)
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=os.environ.get("FSDP_WRAP", "Linear").split(","),
        )
    self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = _fsdp2_on_cpu

if __name__ == "__main__":
    os.environ["ACCELERATE_USE_CPU"] = "true"
    from mm_align.cli import main

    sys.exit(main(sys.argv[1:]))
