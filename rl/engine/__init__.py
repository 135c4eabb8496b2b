"""The training engine: one code path for policy updates, on CPU and on GPU.

``PolicyEngine`` wraps verl's ``TrainingWorker`` (``verl.workers.engine_workers``) with the FSDP2
engine and verl's PPO loss (``verl.workers.utils.losses.ppo_loss``, which dispatches to the policy
loss registry in ``verl.trainer.ppo.core_algos``: vanilla, gspo, cispo, ...). We use verl one
layer below its trainers because none of verl's trainers trains on externally generated data:
our rollouts come from a vLLM server behind the proxy, not from rollout servers verl starts.

Parts
-----
* :mod:`.config`: ``EngineConfig`` and its translation into verl's worker, actor and loss configs;
* :mod:`.batch`: samples into verl's padded PPO tensors and its no-padding layout (the data flow of a step);
* :mod:`.export`: LoRA adapter or full HF model folders vLLM can load;
* :mod:`.checkpoint`: save, load and prune checkpoints; the latest-checkpoint tracker;
* :mod:`.policy`: ``PolicyEngine``, which ties them together and keeps data-parallel ranks in step.

Importing this package changes nothing: verl's CPU platform (:mod:`trainwire.rl.cpu_platform`) is activated
by ``PolicyEngine(cfg)`` and by the config and batch helpers, right before they first need ``verl.workers``.

Running it
----------
* **One process, CPU or one GPU** (tests, CPU demo, the trainer worker): just construct
  ``PolicyEngine(cfg)``. Without CUDA it activates :mod:`rl.cpu_platform` (device ``cpu``,
  backend ``gloo``); with CUDA verl's own CUDA platform and NCCL are used. Either way a
  world-size-1 process group is created if none exists.
* **Many GPUs with torchrun** (SPMD, verl's FSDP way): ``torchrun --nproc-per-node N script.py``;
  every rank constructs ``PolicyEngine(cfg)`` (``init_single_process_group`` keeps torchrun's
  RANK/WORLD_SIZE/MASTER_* and initialises ``cpu:gloo,cuda:nccl``), FSDP2 shards the model over the
  N ranks, and every rank calls ``step`` with *its own shard* of the batch. Ranks may pass
  different numbers of samples: the engine pads every rank to the same count with fully masked
  dummy samples (required by verl's data-parallel mini-batching) and uses the global token /
  sample counts for loss normalisation. ``export`` and ``save_checkpoint`` are
  collective (all ranks must call them); only rank 0 writes the exported folder. The trainer's
  order of these calls is defined once, in :mod:`trainwire.rl.collective`.
* **Many GPUs with Ray** (verl's single-controller way): wrap ``TrainingWorker`` in a
  ``verl.single_controller.ray.RayWorkerGroup`` (``RayResourcePool([n_gpus])`` +
  ``RayClassWithInitArgs(ray.remote(TrainingWorker), config=training_worker_config(cfg))``), call
  ``wg.reset()`` and ``wg.set_loss_fn(policy_loss_fn(cfg))``, and send
  ``to_no_padding(padded_ppo_tensors(samples, pad_id, ...), cfg.temperature, <the non-tensor keys
  build_train_batch sets>)`` to ``wg.train_mini_batch(td)`` (``.get()`` the result); its DP
  dispatch splits the batch across ranks (pad it to a multiple of dp * micro_batch_size). On CPU-only Ray
  workers export ``VERL_USE_EXTERNAL_MODULES=trainwire.rl.cpu_platform VERL_PLATFORM=cpu
  VERL_ENGINE_DEVICE=cuda`` and make the group exist before the worker is built (verl would build the
  invalid backend string ``cpu:gloo,cpu:gloo``). Nothing here hard-codes a world size of 1.
"""

from trainwire.rl.engine.config import EngineConfig
from trainwire.rl.engine.policy import PolicyEngine

__all__ = ["EngineConfig", "PolicyEngine"]
