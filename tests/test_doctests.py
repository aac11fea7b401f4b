"""The small examples in the library's docstrings are checked too."""

import doctest
import importlib

import pytest

MODULES = [
    "pipeline.pretrain",
    "pipeline.lm",
    "pipeline.reward.data",
    "pipeline.reward.evaluation",
    "pipeline.reward.losses",
    "pipeline.reward.scorer",
    "pipeline.tokenizer.encoder",
    "pipeline.data.conversations",
    "pipeline.data.loader",
    "pipeline.data.corpus.base",
    "pipeline.data.corpus.default",
    "pipeline.data.corpus.documents",
    "pipeline.data.preferences",
    "pipeline.data.prompts",
    "pipeline.data.records",
    "pipeline.data.shards",
    "pipeline.data.task_candidates",
    "pipeline.data.task_checks",
    "pipeline.rl.gae",
    "pipeline.rl.kl",
    "pipeline.gguf_export",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
