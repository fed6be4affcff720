"""What every launched script (`examples/train_seg.py`, `examples/evaluate_seg.py`) checks and sets up first: that the
launch runs as asked, and the logging of each process."""

import logging
import os

import datasets
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, parse_flag_from_env

logger = get_logger(__name__)


def configure_logging(accelerator: Accelerator) -> None:
    """INFO logs with timestamps; the libraries' warnings on the local main process only."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def check_launch(accelerator: Accelerator, script: str = "examples/train_seg.py") -> None:
    """Fails with a `ValueError` naming the fix when the launch settings would not run as asked: several processes
    that Accelerate would run as independent single-process jobs (torchrun-style launch on a machine without GPU and
    without `ACCELERATE_USE_CPU=1`), or FSDP / DeepSpeed that Accelerate replaced by another mode (on CPU). `script`
    is the launched script, for the command in the message."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched but Accelerate found no GPU and treats each as a separate run. On "
            f"CPU, launch with: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} "
            f"{script} ..."
        )
    for variable, mode in (
        ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
    ):
        if parse_flag_from_env(variable) and accelerator.distributed_type != mode:
            raise ValueError(
                f"The launch asked for {mode.value} but Accelerate runs {accelerator.distributed_type.value} on "
                f"{accelerator.device.type}: {mode.value} needs GPUs. On CPU, launch DDP instead: "
                "ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml "
                f"--num_processes N {script} ..."
            )
    if accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and parse_flag_from_env("ACCELERATE_USE_CPU"):
        logger.warning(
            "`accelerate launch --cpu --num_processes N` starts a single process unless MPI is configured: for N CPU "
            "processes use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N."
        )


__all__ = ["check_launch", "configure_logging"]
