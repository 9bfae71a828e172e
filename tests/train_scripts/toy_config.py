"""Config of the trainer tests' toy stage: ``--config=tests/train_scripts/toy_config.py``."""

from tests.train_scripts.toy_stage import toy_config


def get_config(arg=None):
    return toy_config(arg)
