"""A CPU platform for verl, registered through verl's own platform plugin mechanism.

verl 0.9.1 has platforms for CUDA, NPU and ROCm only. On a machine without an accelerator it
falls back to the name ``cuda`` and then fails on the first CUDA call. This module supplies the
missing piece the way verl intends third-party platforms to be added
(``verl.plugin.platform.PlatformRegistry``): device ``cpu``, collective backend ``gloo``, and
no-op memory / cache / profiler calls.

It is *only* activated when no CUDA device is visible. On a GPU machine :func:`activate` leaves
verl's auto-detected CUDA platform (and NCCL) alone, so the training code path is the same on
both.

Two ways to turn it on:

* in-process (tests, CPU demo, the trainer worker): call :func:`activate` before anything imports
  ``verl.workers``' engines (``PolicyEngine(cfg)`` and the config helpers of :mod:`trainwire.rl.engine` do this
  for you). Importing this module only registers the platform; it never activates it;
* in processes verl starts itself (Ray workers): export
  ``VERL_USE_EXTERNAL_MODULES=trainwire.rl.cpu_platform`` and ``VERL_PLATFORM=cpu``; importing this module
  registers the platform and verl's auto-detection picks it by name. :func:`activate` also sets
  ``VERL_ENGINE_DEVICE=cuda`` there, because verl registers its FSDP engine under the device keys
  ``cuda``/``npu`` only; the engine still places every tensor on the platform's device (``cpu``).

:func:`init_single_process_group` creates the one-process torch.distributed group verl's engines
require even for a single process. (verl's own helper would build the backend string
``cpu:gloo,cpu:gloo``, which torch rejects, so on CPU the group must exist before verl looks.)
"""

from __future__ import annotations

import os
import socket
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform, set_platform
from verl.plugin.platform import platform_manager as _platform_manager

__all__ = [
    "PlatformCPU",
    "activate",
    "cuda_available",
    "init_single_process_group",
]

PLATFORM_NAME = "cpu"


def cuda_available() -> bool:
    return torch.cuda.is_available()


class _CpuDeviceModule(types.ModuleType):
    """Stands in for ``torch.cuda`` where verl calls ``get_torch_device().<fn>()``.

    Delegates to ``torch.cpu`` where that has the function, and answers the memory, cache, RNG and
    IPC queries that only make sense on an accelerator with harmless constants or no-ops.
    """

    def __init__(self) -> None:
        super().__init__("trainwire.rl.cpu_platform.device_module")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    # availability / placement
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    # memory
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return (0, 0)

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    # RNG: the CPU generator is the only one; verl saves it separately as "cpu".
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for hosts without an accelerator: device ``cpu``, backend ``gloo``."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Auto-detection probes registered platforms in registration order (cuda, npu, rocm, then
        # this one); claim the host only when no CUDA device is visible.
        return not torch.cuda.is_available()

    def current_device(self) -> str:
        # verl passes get_device_id() straight to ``tensor.to(...)``; an int would mean cuda:N.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Not read by anything on CPU; a name no launcher sets.
        return "CPU_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_cpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def activate() -> PlatformBase:
    """Make verl use :class:`PlatformCPU` when no CUDA device is visible; return the platform.

    Must run before ``verl.workers`` is imported (its FSDP engine module reads the device name at
    import time). With a CUDA device this is a no-op apart from returning verl's platform.
    """
    if cuda_available():
        return get_platform()
    current = _platform_manager._current_platform
    if not isinstance(current, PlatformCPU):
        set_platform(PlatformCPU())
    # Child processes (Ray workers) re-detect the platform by name.
    os.environ["VERL_PLATFORM"] = PLATFORM_NAME
    # verl's FSDP engine is registered for device keys "cuda"/"npu" only; select it by override.
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    return get_platform()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(backend: Optional[str] = None) -> None:
    """Create a world-size-1 torch.distributed group for in-process training.

    Sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT (keeping any already
    set, e.g. by torchrun) and initialises the default group if none exists. ``backend`` defaults
    to ``gloo`` without CUDA and to verl's ``cpu:gloo,cuda:nccl`` with it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        # A lone process (the trainer CLI) may inherit MASTER_PORT etc. from a parent that holds a group on
        # that port (a test runner, a notebook): a fresh free port is the only safe choice.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            os.environ.pop(key, None)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda_available() else "gloo"
    if cuda_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
