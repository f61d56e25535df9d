"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

One process per host (TPU VM worker, or GPU node) or one per GPU; every process runs the same
command. How the processes find each other, first match wins:

1. config: `mesh.coordinator_address` (host:port of process 0), `mesh.num_processes`,
   `mesh.process_id` (`--config.mesh.coordinator_address=10.0.0.2:1234 ...`);
2. environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
   (and optionally `JAX_LOCAL_DEVICE_IDS`), e.g. set by launch/gpu_single_host.sh;
3. Slurm (`srun`, more than one task): JAX reads SLURM_* (first node of
   SLURM_STEP_NODELIST is the coordinator, SLURM_NTASKS processes, SLURM_PROCID);
4. Open MPI (`mpirun`, more than one rank): JAX reads OMPI_* variables;
5. Cloud TPU pod slice (more than one worker in TPU_WORKER_HOSTNAMES, or `mesh.distributed=on`
   as launch/tpu_pod.sh passes): JAX asks the TPU metadata server.

Anything else is a single process and nothing is initialised. `mesh.distributed`: "auto"
(the above), "on" (always initialise, letting JAX auto-detect what the config does not give),
"off" (never).

Timeouts of JAX's coordination service (`mesh.*`, seconds; defaults in `TIMEOUTS` are meant
for TPU pods and multi-node GPU jobs):

* `init_timeout_s`: how long process 0's coordinator waits for every process to connect
  (workers of a big slice start minutes apart: ssh fan-out, imports);
* `heartbeat_timeout_s`: a process that sent no heartbeat for this long is declared dead and
  every other process is ended by the coordination service (a fatal log naming the missing
  task, then SIGABRT), so a lost host ends the job within about this time instead of leaving
  the others blocked in a collective;
* `shutdown_timeout_s`: how long a finished process waits at the exit barrier for the others.

A job whose host died is restarted by rerunning the same command on all hosts: it resumes
from the last complete checkpoint (launch/README.md).
"""

import os
from typing import Mapping, Optional

import jax
import ml_collections

from jaxgen.errors import ConfigError

MODES = ("auto", "on", "off")
# config.mesh key -> (jax.distributed.initialize argument, default seconds).
TIMEOUTS = {
    "init_timeout_s": ("initialization_timeout", 900),
    "heartbeat_timeout_s": ("heartbeat_timeout_seconds", 100),
    "shutdown_timeout_s": ("shutdown_timeout_seconds", 300),
}


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> Optional[int]:
  value = env.get(key)
  if value in (None, ""):
    return default
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def timeouts(mesh_config: Optional[ml_collections.ConfigDict]) -> dict:
  """`jax.distributed.initialize` timeout arguments from `mesh.*_timeout_s` (or `TIMEOUTS`)."""
  out = {}
  for key, (arg, default) in TIMEOUTS.items():
    value = default if mesh_config is None else mesh_config.get(key, default)
    try:
      seconds = int(value)
    except (TypeError, ValueError):
      seconds = 0
    if seconds < 1:
      raise ConfigError(f"mesh.{key}={value!r} must be a positive number of seconds "
                        f"(default {default})")
    out[arg] = seconds
  return out


def resolve(mesh_config: Optional[ml_collections.ConfigDict],
            env: Mapping[str, str]) -> Optional[dict]:
  """What `initialize` would do, as a pure function of the config and the environment.

  Returns None (single process: do nothing) or {"source": str, "kwargs": dict,
  "timeouts": dict} where kwargs say where the processes are (empty: JAX auto-detects the
  cluster), timeouts are `timeouts(mesh_config)` (both go to `jax.distributed.initialize`), and
  "num_processes" / "process_id" are what the source says, when it says.
  """
  plan = _locate(mesh_config, env)
  if plan is not None:
    plan["timeouts"] = timeouts(mesh_config)
  return plan


def _locate(mesh_config, env: Mapping[str, str]) -> Optional[dict]:
  """`resolve` without the timeouts: the source, the process count / id and the kwargs."""
  get = (lambda k, d: mesh_config.get(k, d)) if mesh_config is not None else (lambda k, d: d)
  mode = str(get("distributed", "auto"))
  if mode not in MODES:
    raise ConfigError(f"mesh.distributed {mode!r} unknown; use one of {MODES}")
  if mode == "off":
    return None
  address = str(get("coordinator_address", "") or "")
  if address:
    n, pid = int(get("num_processes", 0)), int(get("process_id", -1))
    if n < 1 or not 0 <= pid < n:
      raise ConfigError(f"mesh.coordinator_address={address} also needs mesh.num_processes >= 1 "
                        f"and 0 <= mesh.process_id < num_processes (got {n}, {pid})")
    return {"source": "config", "num_processes": n, "process_id": pid,
            "kwargs": {"coordinator_address": address, "num_processes": n, "process_id": pid}}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    n, pid = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
    if n is None or pid is None or not 0 <= pid < n:
      raise ConfigError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and "
                        f"JAX_PROCESS_ID (0 <= id < count), got {n}, {pid}")
    kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n,
              "process_id": pid}
    if env.get("JAX_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return {"source": "env", "num_processes": n, "process_id": pid, "kwargs": kwargs}
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")
  if all(k in env for k in slurm_vars) and _int(env, "SLURM_NTASKS", 1) > 1:
    return {"source": "slurm", "num_processes": _int(env, "SLURM_NTASKS"),
            "process_id": _int(env, "SLURM_PROCID"), "kwargs": {}}
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return {"source": "ompi", "num_processes": _int(env, "OMPI_COMM_WORLD_SIZE"),
            "process_id": _int(env, "OMPI_COMM_WORLD_RANK"), "kwargs": {}}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {"source": "tpu", "num_processes": len(hosts.split(",")),
            "process_id": _int(env, "TPU_WORKER_ID"), "kwargs": {}}
  if mode == "on":
    return {"source": "auto", "num_processes": None, "process_id": None, "kwargs": {}}
  return None


def is_initialized() -> bool:
  try:
    from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top
    return _dist.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def initialize(config: Optional[ml_collections.ConfigDict] = None,
               env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """Initialises JAX's distributed runtime once per process when `resolve` says so.

  Must run before anything touches the devices (it is the first thing `loop.build` does).
  Returns the plan used (None for a single process).
  """
  plan = resolve(None if config is None else config.get("mesh"),
                 os.environ if env is None else env)
  if plan is None or is_initialized():
    return plan
  try:
    jax.distributed.initialize(**plan["kwargs"], **plan["timeouts"])
  except RuntimeError as e:
    raise ConfigError(f"jax.distributed.initialize ({plan['source']}) failed: {e}") from None
  if jax.process_index() == 0:
    heartbeat = plan["timeouts"]["heartbeat_timeout_seconds"]
    print(f"distributed: {jax.process_count()} processes ({plan['source']}), "
          f"{jax.device_count()} devices, {jax.local_device_count()} per process; a process "
          f"silent for {heartbeat} s ends the job (mesh.heartbeat_timeout_s)", flush=True)
  return plan
