"""A small PaddleRec-style runner: one YAML config drives training, evaluation and export.

Entry point: `python -m paddlerec.run -m config.yaml`. The model and reader are files
named in the config; see `paddlerec.contract` for what they provide.
"""

__version__ = "1.0.0"
