"""The app's Hydra config, composed in-process the way ``python -m dist_supernet.train`` composes it."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from dist_supernet.train.config import register_resolvers

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str, hydra_config: bool = False):
    """``conf/train.yaml`` with ``overrides`` (and, with ``hydra_config``, the ``hydra`` node)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)
