"""Multi-process start-up: jax.distributed when the environment asks for it, nothing otherwise."""

from __future__ import annotations

import os

from absl import logging
import jax

# Environment variables a launcher (launch.py, a cluster script) sets for non-TPU clusters.
ENV_COORDINATOR = 'AVAE_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'AVAE_NUM_PROCESSES'
ENV_PROCESS_ID = 'AVAE_PROCESS_ID'
ENV_TIMEOUT = 'AVAE_DISTRIBUTED_TIMEOUT_S'
ENV_AUTO = 'AVAE_DISTRIBUTED_AUTO'


def _on_multihost_tpu() -> bool:
  """True on a TPU VM that belongs to a pod slice (several workers)."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize() -> None:
  """Starts jax.distributed for multi-process runs; a no-op for a single process.

  TPU pod slices are detected by JAX itself. Other clusters set AVAE_COORDINATOR_ADDRESS,
  AVAE_NUM_PROCESSES and AVAE_PROCESS_ID (launch.py does); AVAE_DISTRIBUTED_AUTO=1 asks
  JAX to detect a Slurm or Open MPI cluster. AVAE_DISTRIBUTED_TIMEOUT_S bounds how long
  a process waits for a peer that died.
  """
  timeout = int(os.environ.get(ENV_TIMEOUT, '100'))
  if os.environ.get(ENV_COORDINATOR):
    num = int(os.environ[ENV_NUM_PROCESSES])
    pid = int(os.environ[ENV_PROCESS_ID])
    if jax.config.jax_platforms in (None, '', 'cpu') and num > 1:
      # CPU collectives across processes need gloo; harmless where GPUs/TPUs do the work.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ[ENV_COORDINATOR], num_processes=num,
        process_id=pid, initialization_timeout=timeout,
        heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
  elif _on_multihost_tpu() or os.environ.get(ENV_AUTO) == '1':
    jax.distributed.initialize(initialization_timeout=timeout,
                               heartbeat_timeout_seconds=timeout)
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
