"""Config files, presets, overrides and the model registry."""

import glob
import os

import pytest

from jaxgen.config import build_model, load_config
from jaxgen.errors import ConfigError
from jaxgen.registry import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_has_smoke_and_run_command_docstring(path):
  config = load_config(f"{path}:smoke")
  assert config.training.steps <= 20
  with open(path) as f:
    first = f.read().split('"""')[1].strip().splitlines()[0]
  assert first.startswith("python -m jaxgen.main --config=configs/" + os.path.basename(path))


def test_overrides_are_typed():
  c = load_config(os.path.join(ROOT, "configs/unet_mnist.py:smoke"),
                  ["training.steps=7", "optimizer.lr=1", "model.channel_mult=(1,2)",
                   "checkpoint.async_save=false", "sample.method=ddpm"])
  assert c.training.steps == 7 and isinstance(c.optimizer.lr, float) and c.optimizer.lr == 1.0
  assert c.model.channel_mult == (1, 2) and c.checkpoint.async_save is False
  assert c.sample.method == "ddpm"


@pytest.mark.parametrize("override,message", [
    ("training.stepz=3", "unknown config key 'training.stepz'"),
    ("nosuch.a=3", "has no field 'nosuch'"),
    ("training.steps=abc", "not a valid int"),
    ("training.steps", "must look like"),
])
def test_bad_overrides_are_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config(os.path.join(ROOT, "configs/unet_mnist.py"), [override])


def test_unknown_preset_and_missing_file():
  with pytest.raises(ConfigError, match="unknown preset"):
    load_config(os.path.join(ROOT, "configs/unet_mnist.py:nosuch"))
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/nosuch.py")


def test_registry_builds_models_by_name():
  assert "unet" in MODELS.names()
  c = load_config(os.path.join(ROOT, "configs/unet_mnist.py:smoke"))
  assert type(build_model(c.model)).__name__ == "UNet"
  with pytest.raises(ConfigError, match="unknown model 'nosuch'"):
    MODELS.get("nosuch")
