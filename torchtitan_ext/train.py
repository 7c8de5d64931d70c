"""`python -m torchtitan_ext.train --config train_configs/<name>.toml [--section.key value ...]`, alone or
under `torchrun --nproc_per_node=N`."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
import torch
from torchtitan.tools.logging import init_logger, logger
from torchtitan.trainer import Trainer

from .data import DataError
from .checkpoint import CheckpointError
from .preflight import prepare_files
from .toml_config import ConfigError, read_sections, to_trainer_config
from .trainer import NonFiniteLossError
from .validation import validate


def load_config(argv: list[str]) -> Trainer.Config:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.train", allow_abbrev=False)
    parser.add_argument("--config", required=True, type=Path, help="TOML file (see train_configs/)")
    args, overrides = parser.parse_known_args(argv)
    sections = read_sections(args.config, overrides)
    prepare_files(sections, args.config)
    config = to_trainer_config(sections, args.config)
    validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return config


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
    """Build, train, close; the same sequence as torchtitan.train.main."""
    _default_single_process_env()
    trainer = None
    try:
        trainer = config.build()
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    init_logger()
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
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
