"""Trains one unCLIP stage (clip, prior, decoder, upsampler) from a config file.

    python train.py --config=configs/prior.py:tiny --workdir=workdirs/prior_tiny \
        [--config.train.steps=2000 --config.optim.lr=3e-4 ...]

Rerunning the same command resumes from the latest checkpoint in ``--workdir``.
Multi-host: start one process per host; clusters (SLURM, Open MPI, TPU VMs) are
detected, or pass ``--coordinator_address=host:port --num_processes=N --process_id=i``.
On SIGTERM a checkpoint is written and the process exits with status 143.
"""

import sys

from absl import app, flags, logging

from unclip_jax import config as config_lib, xla_cpu

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    xla_cpu.prefer_eigen_convolutions()  # before JAX starts; XLA:CPU only
    from unclip_jax import parallel  # noqa: PLC0415 - after flag parsing, before any JAX use
    parallel.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from unclip_jax.train import loop  # noqa: PLC0415
    result = loop.train(_CONFIG.value, _WORKDIR.value)
    if result.preempted:
        sys.exit(143)  # 128 + SIGTERM: "not finished", so schedulers requeue the job


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.app_flags_parser)
