"""The whole run config (:class:`RunConfig`: one section per stage) and :func:`load_config`.

Loading is

    dataclass defaults  <  YAML file  <  command-line ``section.key=value`` overrides

and strict (see :func:`pipeline.config.schema.from_dict`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import DataConfig, TokenizerConfig
from .finetune import RewardStageConfig, SFTStageConfig
from .ppo import PPOStageConfig
from .pretrain import ModelConfig, PretrainConfig
from .schema import ConfigError, from_dict, strict_yaml_load

__all__ = ["RunSection", "ExportConfig", "ReportConfig", "RunConfig", "load_config"]


@dataclass(frozen=True)
class RunSection:
    name: str = "tiny"
    """Run name: the run folder is ``<root>/<name>``."""
    seed: int = 1337
    root: str = "runs"
    """Folder that holds every run."""
    allow_pickle_checkpoints: bool = False
    """Resume under DeepSpeed (``LAUNCH=zero2|zero3``) loads DeepSpeed's own checkpoint files, which DeepSpeed reads
    with ``torch.load(weights_only=False)``: unpickling, which can run code from a tampered file. Off: such a resume
    is refused with this key named; so is an export from a raw ZeRO checkpoint folder (DeepSpeed's zero_to_fp32
    reads it the same way). Every other checkpoint this project reads is loaded with ``weights_only=True``.
    Turning it on only lets a resume read checkpoints; it changes no result (not fingerprinted)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.seed < 2**32:
            problems.append(f"run.seed must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            problems.append(f"run.name must be a plain folder name (no '/', not '.' or '..'), got {self.name!r}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class ExportConfig:
    dir: str = ""
    """The export is always runs/<run>/export/artifact/; a folder here (EXPORT_DIR) gets a copy too."""
    source: Literal["ppo", "sft", "pretrain"] = "ppo"
    """Stage whose model is exported."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights are cast to this dtype."""
    max_shard_size: str = "2GB"
    """safetensors files are split above this size (with model.safetensors.index.json)."""
    license: str = "mit"
    """License id for the model card's metadata."""
    verify_with: tuple[str, ...] = ()
    """More Python interpreters to prove the export loads in (e.g. a venv with transformers 4.x); the
    current one always is. Where the export goes or who checks it does not change what it is (not fingerprinted)."""
    formats: tuple[Literal["hf", "gguf"], ...] = ("hf",)
    """What the export writes: ``hf``, the Hugging Face model directory (always), and ``gguf``: one GGUF file for
    llama.cpp per ``gguf_types`` beside it (``runs/<run>/export/<run>-<type>.gguf``; ``make export FORMAT=gguf``)."""
    gguf_types: tuple[Literal["f32", "f16", "q8_0"], ...] = ("f32", "f16", "q8_0")
    """GGUF output types: f32 (every tensor), f16 or q8_0 (2-D weights; norms, biases, positions stay f32)."""
    gguf_verify_with: str = ""
    """A Python interpreter with llama-cpp-python (``make test-interop`` builds .venv-interop) that proves the GGUF
    files; empty: this interpreter when it can import llama_cpp, else the llama.cpp checks are skipped and the
    manifest says why. Who checks the export does not change it (not fingerprinted)."""
    gguf_n_prompts: int = 200
    """Held-out task prompts (``ppo`` eval set) run greedily in llama.cpp and transformers by the GGUF checks."""

    def __post_init__(self) -> None:
        problems = []
        if "hf" not in self.formats:
            problems.append(f"export.formats={list(self.formats)} must include hf (the GGUF is made from it)")
        if "gguf" in self.formats and not self.gguf_types:
            problems.append("export.gguf_types is empty while export.formats includes gguf")
        if self.gguf_n_prompts < 1:
            problems.append(f"export.gguf_n_prompts must be >= 1, got {self.gguf_n_prompts}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class ReportConfig:
    """The quality bar of the run report (``pipeline/report.py``): the thresholds its checklist marks "met".
    It judges finished stages and changes none of them, so no stage's fingerprint includes it: the reward stage
    records its gate with the thresholds of its run, and PPO and the report judge the same numbers again with the
    current ones."""

    max_wall_time_s: float = 900.0
    """The whole run, every stage done, within this many seconds (15 min: the default run's budget)."""
    min_reward_pair_accuracy: float = 0.85
    """The reward model's held-out pair accuracy at least this."""
    min_ppo_accuracy_gain: float = 0.05
    """PPO's held-out checker accuracy at least this far above the SFT model's (0.05: 5 points)."""
    gate_min_best_of_k_gain: float = 0.15
    """The gate before PPO (issue 19): the reward model's best of ``reward.best_of_k`` SFT samples at least this far
    above the SFT model's greedy accuracy (0.15: 15 points); below it PPO has little gain the reward model can see.
    The reward stage records the gate, PPO warns when it fails (and runs), the report marks it."""
    gate_min_right_wrong_auc: float = 0.90
    """The gate's second condition: the reward model scores a right sample above a wrong one of the same prompt at
    least this often (the best-of-k check's right-vs-wrong AUC; 0.90)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_wall_time_s <= 0:
            problems.append(f"report.max_wall_time_s must be > 0, got {self.max_wall_time_s}")
        if not 0.0 <= self.min_reward_pair_accuracy <= 1.0:
            problems.append(f"report.min_reward_pair_accuracy must be in [0, 1], got {self.min_reward_pair_accuracy}")
        if not -1.0 <= self.min_ppo_accuracy_gain <= 1.0:
            problems.append(f"report.min_ppo_accuracy_gain must be in [-1, 1], got {self.min_ppo_accuracy_gain}")
        if not -1.0 <= self.gate_min_best_of_k_gain <= 1.0:
            problems.append(f"report.gate_min_best_of_k_gain must be in [-1, 1], got {self.gate_min_best_of_k_gain}")
        if not 0.0 <= self.gate_min_right_wrong_auc <= 1.0:
            problems.append(f"report.gate_min_right_wrong_auc must be in [0, 1], got {self.gate_min_right_wrong_auc}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def __post_init__(self) -> None:
        """Checks across sections, at load time: a value that would only fail when its stage starts (after the
        stages before it have spent their time) is refused here. Context lengths are checked where the model is
        this run's own GPT (no ``init_from``/``policy_from`` in the chain); another model's context is only
        known when it is loaded, and its stage checks it then."""
        problems = []
        own = self.model.block_size if not self.pretrain.init_from else None
        if own is not None and self.pretrain.block_size > own:
            problems.append(
                f"pretrain.block_size={self.pretrain.block_size} exceeds model.block_size={own} (the context)"
            )
        sft_ctx = own if not self.sft.init_from else None
        reward_ctx = sft_ctx if not self.reward.init_from else None
        ppo_ctx = sft_ctx if not self.ppo.policy_from else None
        for key, value, ctx in (
            ("sft.max_length", self.sft.max_length, sft_ctx),
            ("reward.max_length", self.reward.max_length, reward_ctx),
        ):
            if ctx is not None and value > ctx:
                problems.append(f"{key}={value} exceeds the model's context, model.block_size={ctx}")
        need = self.ppo.max_prompt_length + self.ppo.max_new_tokens
        if ppo_ctx is not None and need > ppo_ctx:
            problems.append(
                f"ppo.max_prompt_length + ppo.max_new_tokens = {self.ppo.max_prompt_length} + "
                f"{self.ppo.max_new_tokens} = {need} exceeds the policy's context, model.block_size={ppo_ctx}"
            )
        if problems:
            raise ConfigError("; ".join(problems))


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        if raw.lstrip()[:1] in ("[", "{", '"', "'"):  # meant as a YAML list, mapping or quoted string
            raise ConfigError(f"override '{dotted}={raw}': not a valid value: {e}") from None
        node[parts[-1]] = raw  # text YAML cannot read as a plain scalar (a glob like *.txt, @name): the text itself


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config: defaults < YAML file < ``section.key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the closest valid one), bad type, bad value, or YAML error,
            naming the file and the dotted key.
    """
    tree = _read_yaml(Path(path)) if path is not None else {}
    try:
        return from_dict(RunConfig, _with_overrides(tree, overrides))
    except ConfigError as e:
        raise ConfigError(f"{_blame(e, tree, path, overrides)}: {e}" if path or overrides else str(e)) from None


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = strict_yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); save the file as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if loaded is None:
        raise ConfigError(f"{p}: the file is empty (no sections); an empty config would run the code defaults")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return loaded


def _with_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    return tree


def _blame(err: ConfigError, tree: dict[str, Any], path: str | Path | None, overrides: Any) -> str:
    """Where a config error comes from: the file when the file alone gives the same error, else the command line."""
    if path is None:
        return "command line"
    try:
        from_dict(RunConfig, tree)
    except ConfigError as e:
        if str(e) == str(err):
            return str(path)
    return f"command line (over {path})" if overrides else str(path)
