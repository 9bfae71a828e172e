import textwrap

import pytest

from unclip_jax.config import ConfigError, check_keys, load_config


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(textwrap.dedent("""
        import ml_collections

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.variant = arg or "base"
            c.model = ml_collections.ConfigDict({"width": 64 if arg != "tiny" else 8})
            c.lr = 1e-4
            return c
    """))
    return str(path)


def test_variant_and_overrides(cfg_file):
    cfg = load_config(cfg_file + ":tiny", ["model.width=16", "lr=0.5"])
    assert cfg.variant == "tiny" and cfg.model.width == 16 and cfg.lr == 0.5


def test_unknown_key_names_the_key(cfg_file):
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.widht'"):
        load_config(cfg_file, ["model.widht=3"])


def test_wrong_type_names_the_key(cfg_file):
    with pytest.raises(ConfigError, match=r"bad value for config key 'model\.width': 'abc'"):
        load_config(cfg_file, ["model.width=abc"])


def test_locked_config_rejects_new_attributes(cfg_file):
    cfg = load_config(cfg_file)
    with pytest.raises(AttributeError):
        cfg.model.depth = 3


def test_missing_file_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot load config"):
        load_config("no/such/config.py")


def test_check_keys(cfg_file):
    cfg = load_config(cfg_file)
    check_keys(cfg, ["model.width", "lr"])
    with pytest.raises(ConfigError, match="model.depth"):
        check_keys(cfg, ["model.depth"])
