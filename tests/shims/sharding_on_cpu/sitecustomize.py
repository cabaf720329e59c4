"""Test-only (tests/test_scaleout.py): let accelerate shard with FSDP on CPU ranks (gloo), so that everything after
accelerate's device gate runs here as on GPUs. Python imports this module at start-up in every process whose
PYTHONPATH names this folder; it acts only in launched ranks (LOCAL_RANK set) with QLORA_LAB_TEST_FSDP_ON_CPU=1.

The gate it lifts, and nothing else: accelerate 1.15 ``AcceleratorState.__init__`` (accelerate/state.py) turns an
FSDP launch (ACCELERATE_USE_FSDP=true, or a FullyShardedDataParallelPlugin) into ``DistributedType.FSDP`` only inside
its branch for ``MULTI_GPU / MULTI_XPU / MULTI_NPU / ...``; CPU ranks are ``MULTI_CPU``, which that branch does not
list, so on CPU an FSDP config trains as plain data parallel without a word. Here the same three assignments that
branch makes (``distributed_type``, the plugin's mixed precision, ``fsdp_plugin``) are made for ``MULTI_CPU`` too.
torch's ``fully_shard`` itself runs on CPU with gloo (FSDP2: all-gather and reduce-scatter of CPU tensors).
"""

import os

if os.environ.get("QLORA_LAB_TEST_FSDP_ON_CPU") == "1" and "LOCAL_RANK" in os.environ:
    import inspect

    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _init = _state.AcceleratorState.__init__
    _params = inspect.signature(_init)

    def _init_fsdp_on_cpu(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        plugin = _params.bind(self, *args, **kwargs).arguments.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init_fsdp_on_cpu
