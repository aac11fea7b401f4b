"""Check a model the config names (a local folder or a Hub model id) before a stage does any work with it.

The config keys that name a model: ``pretrain.init_from`` (weights only: pretraining keeps its own tokenizer),
``sft.init_from``, ``reward.init_from``, ``ppo.policy_from`` and ``ppo.reward_from`` (a model and its tokenizer);
the chat command's ``--model`` too. ``from_pretrained`` fails on a bad one with a traceback that does not say which
key was wrong (``Repo id must use alphanumeric chars`` for a missing ``./folder``, ``Couldn't instantiate the backend
tokenizer`` for an empty one); :func:`check_model_source` says instead, as a ``StageError`` naming the key, the value
and what is wrong:

- an existing folder must hold ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``) and, where a
  tokenizer is needed, tokenizer files; the message lists those missing; a truncated or corrupt weight file or
  ``config.json`` is named too (``pipeline.filecheck``: headers and structure only, nothing is loaded);
- a name that is no existing folder is tried on the Hub when it is a Hub model id (``gpt2``, ``org/name``), as
  ``from_pretrained`` would: its ``config.json`` is fetched (or found in the local Hugging Face cache, the only
  place looked at offline, ``HF_HUB_OFFLINE=1``), and a failure says whether the Hub was unreachable, offline, or
  has no such model;
- any other name (``./nope``, ``runs/x/sft/artifact``) is a local folder that is not there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .filecheck import check_file
from .runs import StageError

__all__ = ["MODEL_KEYS", "check_model_source", "check_model_sources", "missing_model_files"]

MODEL_KEYS: dict[str, tuple[tuple[str, bool], ...]] = {
    "pretrain": (("pretrain.init_from", False),),
    "sft": (("sft.init_from", True),),
    "reward": (("reward.init_from", True),),
    "ppo": (("ppo.policy_from", True), ("ppo.reward_from", True)),
}
"""Stage -> the config keys naming a model it loads, each with whether its tokenizer is loaded too."""

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
"""Any one of these is a tokenizer's vocabulary (a fast tokenizer's ``tokenizer.json``, or a slow one's files)."""


def missing_model_files(folder: Path, tokenizer: bool = True) -> list[str]:
    """What a Hugging Face model folder lacks, in words (empty when it has a config, weights and a tokenizer)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        missing.append("model weights (*.safetensors or pytorch_model*.bin)")
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    return missing


def _is_hub_id(value: str) -> bool:
    """Whether ``from_pretrained`` would take ``value`` (when no such folder exists) for a Hub model id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _hub_problem(repo_id: str) -> str | None:
    """Why the Hub model ``repo_id`` cannot be loaded (None when its ``config.json`` is on the Hub or cached).

    Fetches ``config.json`` as ``from_pretrained`` would first (the cached copy when offline or unreachable).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(repo_id, "config.json")
        return None
    except GatedRepoError:
        return f"the Hub model '{repo_id}' is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return f"there is no model '{repo_id}' on the Hub (or it is private: log in with `hf auth login`)"
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            return (
                f"the Hub is not reachable offline (HF_HUB_OFFLINE=1) and '{repo_id}' is not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); download it once with network access, or name a local folder"
            )
        return (
            f"the Hub could not be reached and '{repo_id}' is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); check the network, or name a local folder"
        )
    except EntryNotFoundError:
        return f"the Hub repository '{repo_id}' has no config.json: it is not a transformers model"
    except OSError as e:  # other HTTP errors (HfHubHTTPError is an OSError), a cache that cannot be written
        return f"the Hub model '{repo_id}' could not be fetched: {type(e).__name__}: {e}"


def check_model_source(key: str, value: str | Path, tokenizer: bool = True) -> None:
    """Check that ``value`` (the model config key ``key`` names) can be loaded, before any work is done with it.

    Args:
        key: the config key (or option) that names the model, for the message (``sft.init_from``, ``--model``).
        value: a local model folder or a Hub model id, as ``from_pretrained`` takes it (relative to the current
            folder).
        tokenizer: the caller also loads the model's tokenizer (its files must be there).

    Raises:
        StageError: naming ``key``, ``value`` and what is wrong: no such folder, a file, a folder without a model
            config, weights or tokenizer (listing which are missing) or with a truncated or corrupt one, or a Hub
            model that is not reachable (offline, no network) or does not exist.
    """
    text = str(value)
    path = Path(text)
    where = f"{key}={text!r}"
    if path.is_dir():
        missing = missing_model_files(path, tokenizer)
        if missing:
            raise StageError(
                f"{where}: the folder {path.resolve()} holds no usable model: missing {'; '.join(missing)}"
            )
        files = [path / "config.json", *(w for p in WEIGHT_PATTERNS for w in sorted(path.glob(p)))]
        problems = [problem for f in files for problem in check_file(f)]
        if problems:
            raise StageError(f"{where}: the model in {path.resolve()} is damaged: {'; '.join(problems)}")
        return
    if path.exists():
        raise StageError(f"{where}: {path.resolve()} is a file, not a model folder")
    if not _is_hub_id(text):
        raise StageError(
            f"{where}: not found locally (no folder {path.resolve()}), and not a Hub model id ('name' or 'org/name')"
        )
    problem = _hub_problem(text)
    if problem is not None:
        raise StageError(f"{where}: no local folder of that name (in {Path.cwd()}), and {problem}")


def check_model_sources(cfg: Any, stage: str) -> None:
    """:func:`check_model_source` for each model key of ``stage`` (:data:`MODEL_KEYS`) that the run config sets.

    Raises:
        StageError: the first key whose model cannot be loaded (see :func:`check_model_source`).
    """
    for key, tokenizer in MODEL_KEYS.get(stage, ()):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            check_model_source(key, value, tokenizer)
