"""ml_collections configs: `get_config()` in each file returns a locked ConfigDict.

base.py holds every key with its default; variants derive from it (tiny, progressive,
lwm_7b). Launch any of them with
  python -m experiments.train --config configs/<name>.py --workdir DIR [--config.x.y=v]
"""
