"""Stage 2: from VQA data and the embedding caches to trained, scored fused T5s.

Where things live (importing a sub-package imports none of its modules' dependencies):

- :mod:`pipelines.data`: dataset readers and generators, splits, WebDataset shards, tokenizers and
  the training/eval stream joined with the caches (a new dataset reader goes here);
- :mod:`pipelines.metrics`: scoring answers against references (a new metric goes here);
- :mod:`pipelines.train`: ``TrainConfig`` and its presets, the model of a run, the training loop,
  checkpoints and evaluation (a new ``fuse-train`` setting goes into ``train/config.py``);
- :mod:`pipelines.sweep`: a grid of trainings, planned, run, summarised and drawn;
- :mod:`pipelines.quickstart`: the main job end to end on the built-in data;
- :mod:`pipelines.cli`: the console scripts, thin: parse, build a config, call one function (a new
  flag goes into ``cli/options.py`` for ``fuse-train`` and ``fuse-sweep`` alike);
- :mod:`pipelines.errors`, :mod:`pipelines.files`: the exceptions and the atomic file writes all share.

Dependencies point one way: ``cli`` -> ``quickstart``, ``sweep`` -> ``train`` -> ``data`` -> ``metrics``.
"""
