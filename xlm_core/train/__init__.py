"""The training runtime: the task (encoder + discriminator and its loss), parallelism (DDP / FSDP2, applied from
outside), the runtime (device, dtype, peak FLOP/s), the Trainer and its fit loop, checkpoints, validation and the
logging sinks. Like the rest of xlm_core it knows nothing of DVC or Prefect."""
