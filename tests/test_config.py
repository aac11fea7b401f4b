"""Config loading: strictness, types, precedence, every preset YAML loads."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, fingerprint, load_config, to_dict, to_yaml
from pipeline.lineage import all_fingerprints

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert fingerprint(load_config(path)) == fingerprint(cfg)  # loading is deterministic


def test_precedence_default_yaml_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain:\n  lr: 1e-3\n  max_steps: 7\n")
    cfg = load_config(p, ["pretrain.max_steps=9"])
    assert cfg.pretrain.lr == pytest.approx(1e-3)  # YAML's "1e-3" string converted to float
    assert isinstance(cfg.pretrain.lr, float)
    assert cfg.pretrain.max_steps == 9  # CLI beats YAML
    assert cfg.pretrain.batch_size == load_config(None).pretrain.batch_size  # default kept


def test_unknown_key_names_path_and_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "pretrain.learning_rate" in msg and str(p) in msg
    assert "Valid keys" in msg and "max_steps" in msg
    with pytest.raises(ConfigError, match=r"did you mean 'sft.lr'"):
        load_config(None, ["sft.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
        load_config(None, ["modle.n_layer=2"])


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"pretrain.max_steps: expected an integer"):
        load_config(None, ["pretrain.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"tokenizer.kind: 'wordpiece' is not one of"):
        load_config(None, ["tokenizer.kind=wordpiece"])
    with pytest.raises(ConfigError, match=r"model.n_embd=100 is not divisible by model.n_head=3"):
        load_config(None, ["model.n_embd=100", "model.n_head=3"])
    with pytest.raises(ConfigError, match=r"not of the form"):
        load_config(None, ["pretrain.lr"])


def test_nested_sections_and_tuples():
    cfg = load_config(None, ["data.corpus.paths=[a.txt, b.txt]", "sft.dataset.source=x.jsonl"])
    assert cfg.data.corpus.paths == ("a.txt", "b.txt")
    assert cfg.sft.dataset.source == "x.jsonl"
    assert to_dict(cfg)["data"]["corpus"]["paths"] == ["a.txt", "b.txt"]
    assert load_config(None, []).sft.dataset.source == "default"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["sft.lr=1e-4", "data.corpus.paths=[x.txt]"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_fingerprints_follow_lineage():
    base = all_fingerprints(load_config(None))
    changed = all_fingerprints(load_config(None, ["sft.lr=1e-5"]))
    assert changed["tokenizer"] == base["tokenizer"] and changed["pretrain"] == base["pretrain"]
    for stage in ("sft", "reward", "ppo", "export"):
        assert changed[stage] != base[stage], stage
    # where the export goes does not change what it is
    assert all_fingerprints(load_config(None, ["export.dir=/tmp/x"])) == base
    # an external starting model cuts the dependency on pretrain
    ext = all_fingerprints(load_config(None, ["sft.init_from=gpt2", "model.n_layer=2"]))
    assert ext["pretrain"] != base["pretrain"]
    assert ext["sft"] == all_fingerprints(load_config(None, ["sft.init_from=gpt2"]))["sft"]


TINY_FINGERPRINTS = {
    "tokenizer": "44afcc818b816693",
    "pretrain": "51bb059f514aca07",
    "sft": "a7a3f97ff459ccf0",
    "reward": "a592a02107123a22",
    "ppo": "b01ff8508738ce0b",
    "export": "31e3c28ce4463481",
}
"""configs/tiny.yaml's stage fingerprints: a change here means every finished tiny run is stale."""


def test_tiny_fingerprints_are_pinned():
    assert all_fingerprints(load_config(CONFIG_DIR / "tiny.yaml")) == TINY_FINGERPRINTS


def test_ppo_refuses_truncated_sampling_at_load_naming_the_key():
    for override in ("ppo.top_k=50", "ppo.top_p=0.9"):
        with pytest.raises(ConfigError, match=r"ppo.top_k=\d+ / ppo.top_p=[\d.]+: .*full distribution"):
            load_config(None, [override])
    cfg = load_config(None, ["ppo.critic_warmup_steps=3", "ppo.reward_clip=5"])
    assert (cfg.ppo.critic_warmup_steps, cfg.ppo.reward_clip, cfg.ppo.reward_norm) == (3, 5.0, "standardize")


def test_report_section_is_in_no_fingerprint():
    cfg = load_config(None, ["report.max_wall_time_s=60", "report.min_reward_pair_accuracy=0.5"])
    assert cfg.report.max_wall_time_s == 60.0 and cfg.report.min_ppo_accuracy_gain == 0.05
    assert all_fingerprints(cfg) == all_fingerprints(load_config(None))
    with pytest.raises(ConfigError, match=r"report.min_reward_pair_accuracy must be in \[0, 1\], got 2"):
        load_config(None, ["report.min_reward_pair_accuracy=2"])


CARDS = Path(__file__).resolve().parents[1] / "data_cards"
DEFAULT_CARDS = {
    "sft": "generated-tasks-sft.md",
    "reward": "generated-tasks-rewards.md",
    "ppo": "generated-tasks-prompts.md",
}


def _card_naming(name: str) -> list[str]:
    """Cards whose YAML header names ``name`` (hub id or source dataset)."""
    return [p.name for p in CARDS.glob("*.md") if name in p.read_text(encoding="utf-8").split("\n---", 1)[0]]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_dataset_a_config_names_has_a_card(path):
    cfg = load_config(path)
    corpus = cfg.data.corpus
    if corpus.source == "default":
        assert (CARDS / "shakespeare.md").is_file()
    elif corpus.source == "hub":
        assert _card_naming(corpus.hub_name), f"{path}: no data card names {corpus.hub_name}"
    for stage in ("sft", "reward", "ppo"):
        spec = getattr(cfg, stage).dataset
        for source in {spec.source, spec.eval_source} - {""}:
            if source == "default":
                assert (CARDS / DEFAULT_CARDS[stage]).is_file()
            elif source.startswith("hub:"):
                assert _card_naming(source[4:]), f"{path}: {stage}.dataset names {source}, which has no data card"


def test_a_section_written_twice_is_an_error_naming_file_line_and_key(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("pretrain:\n  lr: 1e-3\nsft:\n  lr: 1e-4\npretrain:\n  max_steps: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "duplicate key 'pretrain'" in msg and "line 5" in msg and "line 1" in msg
    p.write_text("pretrain:\n  lr: 1e-3\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3"):
        load_config(p)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=rf"{p}: .*empty"):
        load_config(p)


@pytest.mark.parametrize("key", ["pretrain.warmup_steps=-5", "pretrain.grad_clip=-1", "pretrain.sample_tokens=-1"])
def test_negative_pretrain_counts_are_range_errors_naming_the_key(key):
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{name} must be >= 0"):
        load_config(None, [key])


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["pretrain.max_steps=abc"])
    msg = str(e.value)
    assert msg.startswith("command line") and "pretrain.max_steps" in msg and not msg.startswith(str(p))
    with pytest.raises(ConfigError, match=r"^command line.*did you mean 'sft.lr'"):
        load_config(p, ["sft.lrr=1"])
    p.write_text("pretrain:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=rf"^{p}: pretrain.lr"):
        load_config(p, ["pretrain.max_steps=9"])
    # the file's bad value, fixed on the command line, is no error
    assert load_config(p, ["pretrain.lr=0.01"]).pretrain.lr == pytest.approx(0.01)


def test_a_task_generator_change_makes_the_stages_that_use_its_data_stale(monkeypatch):
    """The generated tasks are made by code, not config: their version is in the fingerprints of the stages that
    read them (a v2 -> v3 change once left seed runs 'done' on the old data)."""
    from pipeline import lineage

    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    before = all_fingerprints(cfg)
    monkeypatch.setattr(lineage, "GENERATOR_VERSION", "999")
    after = all_fingerprints(cfg)
    assert {s for s in before if before[s] != after[s]} == {"sft", "reward", "ppo", "export"}


LOAD_TIME_ERRORS = [
    # (override(s), fragment of the error): values that used to pass loading and fail only when their stage
    # started, after the stages before it had spent their time (issue 17)
    (["pretrain.beta1=2"], r"pretrain.beta1 must be in \[0, 1\), got 2.0"),
    (["pretrain.beta2=-0.1"], r"pretrain.beta2 must be in \[0, 1\)"),
    (["pretrain.eval_interval=0"], r"pretrain.eval_interval must be >= 1, got 0"),
    (["pretrain.num_threads=-1"], r"pretrain.num_threads must be >= 0"),
    (["pretrain.weight_decay=-1"], r"pretrain.weight_decay must be >= 0"),
    (["pretrain.block_size=512"], r"pretrain.block_size=512 exceeds model.block_size=256"),
    (["sft.lr_scheduler=bogus"], r"sft.lr_scheduler='bogus' is not a transformers scheduler; valid: linear"),
    (["sft.lr_scheduler=cosine_with_min_lr"], r"needs its arguments .* in sft.trainer_args.lr_scheduler_kwargs"),
    (["reward.lr_scheduler=bogus"], r"reward.lr_scheduler='bogus' is not a transformers scheduler"),
    (["sft.weight_decay=-1"], r"sft.weight_decay must be >= 0"),
    (["reward.warmup_ratio=1.5"], r"reward.warmup_ratio must be in \[0, 1\)"),
    (["sft.max_length=300"], r"sft.max_length=300 exceeds the model's context, model.block_size=256"),
    (["reward.max_length=300"], r"reward.max_length=300 exceeds the model's context"),
    (["ppo.max_prompt_length=250"], r"ppo.max_prompt_length \+ ppo.max_new_tokens = 250 \+ 12 = 262 exceeds"),
    (["data.tasks.kinds=[say,bogus]"], r"unknown task kind\(s\) \['bogus'\]; valid kinds: add, spell"),
    (["run.seed=-1"], r"run.seed must be in \[0, 2\*\*32\)"),
    (["run.name=a/b"], r"run.name must be a plain folder name"),
]


@pytest.mark.parametrize("overrides,fragment", LOAD_TIME_ERRORS, ids=[o[0] for o, _ in LOAD_TIME_ERRORS])
def test_values_that_would_fail_a_later_stage_are_refused_at_load_blaming_the_command_line(overrides, fragment):
    tiny = CONFIG_DIR / "tiny.yaml"
    with pytest.raises(ConfigError, match=rf"^command line \(over {tiny}\): .*{fragment}"):
        load_config(tiny, overrides)


def test_context_checks_wait_for_the_model_when_it_comes_from_elsewhere():
    """Another model's context is only known once it is loaded: its stage checks it then (stages/ppo.py, sft.py)."""
    tiny = CONFIG_DIR / "tiny.yaml"
    assert load_config(tiny, ["ppo.policy_from=gpt2", "ppo.max_prompt_length=250"]).ppo.max_prompt_length == 250
    assert load_config(tiny, ["pretrain.init_from=gpt2", "sft.max_length=1024"]).sft.max_length == 1024
    cfg = load_config(
        tiny, ["sft.lr_scheduler=cosine_with_min_lr", "sft.trainer_args={lr_scheduler_kwargs: {min_lr: 1e-5}}"]
    )
    assert cfg.sft.lr_scheduler == "cosine_with_min_lr"


def test_the_load_time_name_lists_match_the_code_they_stand_for():
    from transformers import SchedulerType

    from pipeline.config import LR_SCHEDULERS, TASK_KINDS
    from pipeline.data.tasks import FAMILIES

    assert set(TASK_KINDS) == set(FAMILIES)
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_a_config_file_that_is_not_utf8_is_an_error_naming_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: not valid UTF-8 \(byte 0xe9\)"):
        load_config(p)


def test_an_override_yaml_cannot_read_is_taken_as_its_text():
    """A glob (documented for data.corpus.paths) starts with '*', which YAML reads as an alias."""
    assert load_config(None, ["data.corpus.paths=*.txt"]).data.corpus.paths == ("*.txt",)
    assert load_config(None, ["run.name=@try"]).run.name == "@try"
    with pytest.raises(ConfigError, match=r"override 'data.corpus.paths=\[a.txt': not a valid value"):
        load_config(None, ["data.corpus.paths=[a.txt"])  # meant as a list: still an error


@pytest.mark.parametrize(
    "override,fragment",
    [("sft.dataset.max_records=-1", r"sft.dataset: max_records must be >= 0"),
     ("reward.dataset.eval_fraction=2", r"reward.dataset: eval_fraction must be in \[0, 1\), got 2"),
     ("ppo.dataset.eval_fraction=-1", r"ppo.dataset: eval_fraction must be in \[0, 1\)")],
)  # fmt: skip
def test_dataset_counts_and_fractions_are_range_checked(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_an_unknown_key_suggests_a_likely_name_or_none():
    with pytest.raises(ConfigError, match=r"did you mean 'pretrain.lr'\?"):
        load_config(None, ["pretrain.learning_rate=1e-3"])  # transformers' name for it
    with pytest.raises(ConfigError, match=r"did you mean 'pretrain.max_steps'\?"):
        load_config(None, ["pretrain.max_step=3"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain.zzzz=3"])
    assert "did you mean" not in str(e.value) and "Valid keys of pretrain: init_from" in str(e.value)
