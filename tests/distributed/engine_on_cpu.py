"""Run ``mm-align`` under accelerate's FSDP2 or DeepSpeed engine on CPU processes (gloo), for the tests.

accelerate routes FSDP and DeepSpeed to accelerators only (on a CPU it silently falls back to DDP,
MULTI_CPU, or to one process per rank), while torch's ``fully_shard`` and DeepSpeed's CPU
accelerator (``DS_ACCELERATOR=cpu``) both run over gloo. Started under ``torch.distributed.run``,
this launcher makes accelerate's state report the engine named by ``MM_ALIGN_TEST_ENGINE``
(``fsdp2``, ``zero2``, ``zero3``) after accelerate has set up the gloo process group, so the trainer
goes through accelerate's own preparation, clipping, accumulation and state-dict gathering for that
engine. A test harness, not a way to train: on GPUs use ``accelerate launch --config_file
"$(mm-align ls accelerate fsdp)"`` (or ``zero2``, ``zero3``).
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

ENGINE = os.environ.get("MM_ALIGN_TEST_ENGINE", "fsdp2")
_init = AcceleratorState.__init__


def _engine_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)  # (re)reads the process state, which says MULTI_CPU, on every construction
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if ENGINE == "fsdp2":
        if getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                # one FSDP unit per layer class named here (peft's LoRA Linear and the nn.Linear inside it)
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=os.environ.get("FSDP_WRAP", "Linear").split(","),
            )
        self.distributed_type = DistributedType.FSDP
        return
    if getattr(self, "deepspeed_plugins", None) is None:
        plugin = kwargs.get("deepspeed_plugin") or DeepSpeedPlugin()  # accelerate built it from the environment
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
    self.distributed_type = DistributedType.DEEPSPEED


AcceleratorState.__init__ = _engine_on_cpu

if __name__ == "__main__":
    os.environ["ACCELERATE_USE_CPU"] = "true"
    if ENGINE != "fsdp2":  # what `accelerate launch` exports for a DeepSpeed config file
        os.environ.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true",
                          ACCELERATE_DEEPSPEED_ZERO_STAGE=ENGINE.removeprefix("zero"),
                          ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true",
                          ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="none",
                          ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="none")
    from mm_align.cli import main

    sys.exit(main(sys.argv[1:]))
