"""One of two processes training the toy stage together (CPU, gloo collectives).

    python -m tests.train_scripts.multiprocess_worker PROCESS_ID PORT WORKDIR [MODE]

MODE 'resume' (default): trains 4 steps (checkpoints at 2 and 4), then calls ``train``
again with 6 steps, which restores step 4 onto the mesh and continues.
MODE 'sigterm': a slow 40-step run that the test stops with SIGTERM to process 0 only;
both processes must save at the same step and exit with 143.
XLA_FLAGS (2 devices per process) is set by the test.
"""

import sys


def multiprocess_config(steps):
    from tests.train_scripts.toy_stage import toy_config
    config = toy_config()
    config.train.update(steps=steps, ckpt_every=2, batch_size=8, log_every=1)
    config.optim.update(schedule="constant", warmup=2)
    config.model.log_ids = True
    config.mesh.update(data=-1, fsdp=2)
    return config


def main():
    process_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "resume"
    from unclip_jax import parallel
    assert parallel.init_distributed(f"localhost:{port}", 2, process_id)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from unclip_jax.train import loop
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    if mode == "sigterm":
        config = multiprocess_config(40)
        config.data.sleep_s = 0.2
        result = loop.train(config, workdir)
        print(f"process {process_id}: stopped at step {result.step}", flush=True)
        sys.exit(143 if result.preempted else 0)
    first = loop.train(multiprocess_config(4), workdir)
    assert first.step == 4, first.step
    second = loop.train(multiprocess_config(6), workdir)
    assert second.step == 6, second.step
    print(f"process {process_id}: done at step {second.step}", flush=True)


if __name__ == "__main__":
    main()
