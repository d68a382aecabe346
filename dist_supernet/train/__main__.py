"""`torchrun --standalone --nproc_per_node=2 -m dist_supernet.train [hydra overrides]`.

A mistake in the config prints one line, ``error: optim.lr=-1.0: must be > 0``,
on every rank and exits with status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dist_supernet.models import is_supernet
from dist_supernet.train.config import check_group_choices, register_resolvers
from dist_supernet.train.faults import runtime_fault_message
from dist_supernet.train.supernet_trainer import SupernetTrainer
from dist_supernet.train.trainer import Trainer, setup_logging

# A checkout (or editable install) reads conf/ at the repository root; a regular
# install ships the same files as dist_supernet/conf (see setup.py).
_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
CONF_DIR = _REPO_CONF if (_REPO_CONF / "train.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf"
register_resolvers()


def fail(error: Exception, message: str | None = None, status: int = 2) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {message or error}", file=sys.stderr, flush=True)
    sys.exit(status)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def run(cfg: DictConfig) -> None:
    setup_logging()
    try:  # ValueErrors before the first step are the user's: bad values, missing files
        # A family registered with supernet=True trains sampled subnets and ends with search and export.
        trainer_cls = SupernetTrainer if is_supernet(cfg.model.get("name")) else Trainer
        trainer = trainer_cls(cfg, output_dir=Path(HydraConfig.get().runtime.output_dir))
    except ValueError as e:
        fail(e)
    try:
        trainer.fit()
    except Exception as e:  # a hung peer or a diverged run: one line, status 1 (torchrun may restart)
        message = runtime_fault_message(e)
        if message is None:
            raise
        fail(e, message, status=1)
    finally:
        trainer.close()


def main() -> None:
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)
    except ValueError as e:
        fail(e)
    run()


if __name__ == "__main__":
    main()
