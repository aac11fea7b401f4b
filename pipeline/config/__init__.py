"""Typed run configuration: frozen dataclasses, YAML loading, dotted CLI overrides, fingerprints.

A run is described by one YAML file with one section per stage. Loading is

    dataclass defaults  <  YAML file  <  command-line ``section.key=value`` overrides

and is strict: an unknown key is an error naming the full dotted path and the closest valid
name; every value is checked against its annotation (PyYAML reads ``1e-3`` as a string, so
numbers given as strings are converted when they parse, and rejected when they do not).

Usage::

    cfg = load_config("configs/tiny.yaml", ["sft.lr=1e-4", "run.name=try2"])
    cfg.sft.lr  # 0.0001

Modules: ``schema`` (strict dict <-> dataclass conversion, YAML text, fingerprints), ``data`` (tokenizer,
corpus, generated tasks, dataset specs), ``pretrain`` (model, pretraining), ``finetune`` (SFT, reward model),
``ppo``, ``run`` (the whole :class:`RunConfig`, the run, export and report sections, :func:`load_config`).
"""

from .data import (
    MAX_K_NEAR_MISSES_ONLY,
    TASK_KINDS,
    CorpusConfig,
    DataConfig,
    DatasetSpec,
    TasksConfig,
    TokenizerConfig,
)
from .finetune import LR_SCHEDULERS, RewardStageConfig, SFTStageConfig
from .ppo import PPOStageConfig
from .pretrain import ModelConfig, PretrainConfig
from .run import ExportConfig, ReportConfig, RunConfig, RunSection, load_config
from .schema import ConfigError, fingerprint, from_dict, to_dict, to_yaml

__all__ = [
    "ConfigError",
    "RunSection",
    "TokenizerConfig",
    "CorpusConfig",
    "MAX_K_NEAR_MISSES_ONLY",
    "TASK_KINDS",
    "LR_SCHEDULERS",
    "TasksConfig",
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "DatasetSpec",
    "SFTStageConfig",
    "RewardStageConfig",
    "PPOStageConfig",
    "ExportConfig",
    "ReportConfig",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "to_yaml",
    "fingerprint",
]
