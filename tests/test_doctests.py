"""The small examples in the library's docstrings are checked too."""

import doctest
import importlib

import pytest

MODULES = [
    "pipeline.pretrain",
    "pipeline.reward",
    "pipeline.tokenizer",
    "pipeline.data.chat",
    "pipeline.data.corpus",
    "pipeline.data.preferences",
    "pipeline.data.prompts",
    "pipeline.data.records",
    "pipeline.data.shards",
    "pipeline.data.tasks",
    "pipeline.rl.gae",
    "pipeline.rl.kl",
    "pipeline.rl.rollout",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
