"""`python -m torchtitan_ext.train --config train_configs/<name>.toml [--section.key value ...]`, alone or
under `torchrun --nproc_per_node=N`."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import compat

if TYPE_CHECKING:
    from torchtitan.trainer import Trainer

# torchtitan's trainer (and so .toml_config, .trainer, .validation) is imported inside the functions below, after
# compat.apply(): on torch 2.11 importing it needs a shim (compat._install_data_parallel_mesh_dims_stand_in), and
# this module, imported by tests and tools, must patch nothing at import.


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    from .toml_config import read_sections

    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.train", allow_abbrev=False)
    parser.add_argument("--config", required=True, type=Path, help="TOML file (see train_configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (files it extends + overrides) as TOML and exit")
    args, overrides = parser.parse_known_args(argv)
    return args, read_sections(args.config, overrides)


def _build_config(sections: dict[str, Any], config_path: Path) -> Trainer.Config:
    """The Trainer.Config of checked sections, after the files they name are checked (or created). The one place
    a built config is checked before any work starts."""
    from .preflight import prepare_files
    from .toml_config import to_trainer_config
    from .validation import validate

    prepare_files(sections, config_path)
    config = to_trainer_config(sections, config_path)
    validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return config


def load_config(argv: list[str]) -> Trainer.Config:
    args, sections = _parse(argv)
    return _build_config(sections, args.config)


def _default_single_process_env() -> None:
    """Without torchrun, run as rank 0 of 1 (torchtitan always initialises a process group)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="localhost",
                      MASTER_PORT=str(port))


def run(config: Trainer.Config) -> None:
    """Build, train, close; the same sequence as torchtitan.train.main (which with
    [checkpoint] create_seed_checkpoint saves the initialised model as step 0 instead of training: the common
    starting point of runs whose initialisation differs, e.g. per pipeline stage)."""
    compat.apply()
    _default_single_process_env()
    trainer = None
    try:
        trainer = config.build()
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise ValueError("[checkpoint] create_seed_checkpoint needs one process and [checkpoint] enable")
            trainer.checkpointer.save(curr_step=0, last_step=True)
            return
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
            # Free the trainer's reference cycles (modules, FSDP and pipeline state, which can hold gloo work) now,
            # not during interpreter finalization, where freeing such work can abort the process (SIGABRT,
            # "terminate called without an active exception"; see pytorch/pytorch#179291).
            del trainer
            gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    compat.apply()
    from torchtitan.tools.logging import init_logger, logger

    from .checkpoint import CheckpointError
    from .data import DataError
    from .toml_config import ConfigError, to_toml
    from .trainer import NonFiniteLossError

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, sections = _parse(argv)
        if args.print_config:  # before init_logger: torchtitan logs to stdout, which holds only the TOML here
            print(to_toml(sections), end="")
            return
        init_logger()
        config = _build_config(sections, args.config)
    except ConfigError as err:
        init_logger()
        logger.error(str(err))
        sys.exit(2)
    try:
        run(config)
    except DataError as err:  # found while building the dataloader (before the first step) or reading data
        logger.error(f"data error: {err}")
        sys.exit(2)
    except (CheckpointError, NonFiniteLossError) as err:
        logger.error(str(err))
        sys.exit(1)


if __name__ == "__main__":
    main()
