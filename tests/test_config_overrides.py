"""Every leaf of every shipped config can be set on the command line.

The README's pattern `--config.x.y=v` must work for every key, also the optional ones
whose default is None (typed placeholders, experiments/config_dicts.py): each config
file in configs/ is parsed through absl flags (ml_collections.config_flags, as
experiments/train.py parses it) with an override of every leaf, and each override must
take effect with the value and type given.
"""
import pathlib

import pytest
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

# ml_collections loads config files with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                 if p.name != "__init__.py")


def _leaves(cfg, prefix=""):
  """(dotted name, value, type) of every leaf; placeholders report their type."""
  for key in cfg.keys():
    value = cfg[key]
    if isinstance(value, config_dict.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      try:
        field_type = cfg.get_ref(key).get_type()
      except ValueError:  # a bare None (not a placeholder): the flag parser refuses it
        field_type = type(None)
      yield f"{prefix}{key}", value, field_type


def _new_value(name, value, field_type):
  """A value of `field_type` that differs from `value`, and its command-line text."""
  if field_type is bool:
    return (not value), str(not value).lower()
  if field_type is int:
    new = 7 if value is None else value + 1
  elif field_type is float:
    new = 0.5 if value is None else value * 2 + 0.25
  elif field_type is str:
    new = f"{value or ''}override"
    return new, new
  elif field_type is tuple:
    if name == "stages" or (value and isinstance(value[0], dict)):
      new = ({"seq_len": 64, "steps": 3},) if not value else (dict(value[0], steps=5),)
    elif not value:
      new = (64, 128)
    else:
      new = value[:1] if len(value) > 1 else value * 2
  elif field_type in (object, type(None)):  # union placeholder: a str (path, glob)
    new = f"/data/{name.replace('.', '_')}/*.bin"
    return new, new
  else:
    raise AssertionError(f"{name}: no override generator for {field_type}")
  return new, repr(new)


def _parse(path, overrides):
  """The config file `path` after absl parses `--config=path` and `overrides` (the
  flag reads its overrides from `sys_argv`, as experiments/train.py's from sys.argv)."""
  argv = ["train", f"--config={path}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_leaf_overridable_on_the_command_line(path):
  defaults = list(_leaves(_parse(path, [])))
  # Training configs carry every trainer key; the arena's config has its own few.
  assert len(defaults) > (25 if path.stem == "arena" else 80)
  want, argv = {}, []
  for name, value, field_type in defaults:
    want[name], text = _new_value(name, value, field_type)
    argv.append(f"--config.{name}={text}")

  got = {name: value for name, value, _ in _leaves(_parse(path, argv))}
  for name, value in want.items():
    assert got[name] == value and type(got[name]) is type(value), (name, got[name])
