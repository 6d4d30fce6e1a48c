"""Every shipped config builds, validates for the device count it documents, and locks."""
import pytest

from configs import base, lwm_7b, progressive, tiny
from experiments import config_lib


@pytest.mark.parametrize("module, devices", [(tiny, 8), (progressive, 8)])
def test_cpu_configs_validate(module, devices):
  config = module.get_config()
  config.lock()
  stages = config_lib.check_config(config, num_devices=devices)
  assert stages[-1].last_step == sum(s.steps for s in stages)
  with pytest.raises(AttributeError):
    config.train.no_such_key = 1


def test_progressive_extends_context_4x():
  # Resharding and RoPE changes between stages run in test_readme_commands.py.
  stages = config_lib.stages(progressive.get_config())
  lengths = [s.data["seq_len"] for s in stages]
  assert lengths == sorted(lengths) and lengths[-1] >= 4 * lengths[0]
  assert all(s.mesh["dp"] * s.mesh["sp"] == 8 for s in stages)
  assert all(s.data["seq_len"] % (2 * s.mesh["sp"]) == 0 for s in stages)
  assert [s.first_step for s in stages[1:]] == [s.last_step for s in stages[:-1]]


def test_lwm_7b_recipe_shapes():
  config = lwm_7b.get_config()
  stages = config_lib.stages(config)
  assert stages[-1].data["seq_len"] == 1 << 20
  model = stages[-1].model
  assert (model.hidden_size, model.num_hidden_layers, model.rope_theta) == (
      4096, 32, 50_000_000.0)
  assert model.shard_params_over_sp and model.attention == "ring"
  for s in stages:
    assert s.mesh["dp"] * s.mesh["sp"] == 64
    assert s.data["seq_len"] % (2 * s.mesh["sp"]) == 0


def test_base_is_complete():
  c = base.get_config()
  for section in ("model", "mesh", "data", "optim", "train", "eval"):
    assert section in c
