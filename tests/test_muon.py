"""``pretrain.optimizer: muon`` (issue 18): the parameter split, one schedule for both optimizers, bit-identical
resume with Muon's state, the refusal under DeepSpeed ZeRO; and what ``pretrain.dtype: auto`` resolves to on a CPU
with and without native bf16 (CPU features mocked)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from pipeline import precision
from pipeline.config import ConfigError, ModelConfig, PretrainConfig, load_config
from pipeline.config.pretrain import MUON_UNDER_ZERO
from pipeline.lineage import all_fingerprints
from pipeline.model import GPT
from pipeline.precision import cpu_bf16_feature, cpu_flags, resolve_dtype
from pipeline.pretrain import build_optimizers, lr_at, muon_parameters, set_schedule, train
from pipeline.runs import StageDir
from pipeline.training import Interrupted

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

V, T = 64, 16


def _model(bias: bool = True) -> GPT:
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V, bias=bias))


def _muon_cfg(**kw) -> PretrainConfig:
    base = dict(optimizer="muon", batch_size=4, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, muon_lr=0.02)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one precision per process: start and leave these tests with none set."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


# ----------------------------------------------------------------------------- the parameter split


@pytest.mark.parametrize("bias", [True, False])
def test_muon_and_adamw_cover_every_parameter_exactly_once(bias):
    model = _model(bias)
    adamw, muon = build_optimizers(model, _muon_cfg(), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    in_muon = [id(p) for g in muon.param_groups for p in g["params"]]
    everything = [id(p) for p in model.parameters()]  # the tied LM head / token embedding appears once
    assert sorted(in_adamw + in_muon) == sorted(everything)  # each exactly once, none left out
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[i] for i in in_muon}
    expected = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert muon_names == expected
    adamw_names = {names[i] for i in in_adamw}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= adamw_names
    assert model.lm_head.weight is model.transformer.wte.weight  # so the LM head is trained by AdamW too
    assert all(
        ".ln_" in n or n.endswith(".bias") for n in adamw_names - {"transformer.wte.weight", "transformer.wpe.weight"}
    )
    decay, no_decay = adamw.param_groups  # AdamW's own rule on what it keeps: decay on the embeddings only
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert muon.param_groups[0]["nesterov"] and muon.param_groups[0]["weight_decay"] == 0.0
    assert len(muon_parameters(model)) == 8


def test_adamw_default_is_the_models_own_optimizer():
    torch.manual_seed(0)
    a = _model()
    torch.manual_seed(0)
    b = _model()
    (mine,) = build_optimizers(a, PretrainConfig(), "cpu")
    theirs = b.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert [len(g["params"]) for g in mine.param_groups] == [len(g["params"]) for g in theirs.param_groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in mine.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups
    ]


def test_one_schedule_scales_both_learning_rates_and_warms_muon_momentum():
    cfg = _muon_cfg(max_steps=20, warmup_steps=4, muon_momentum_warmup_steps=10)
    opts = build_optimizers(_model(), cfg, "cpu")
    for step in (0, 3, 4, 10, 19, 25):
        lr = set_schedule(opts, step, cfg)
        assert lr == lr_at(step, cfg)
        assert all(g["lr"] == lr for g in opts[0].param_groups)
        assert opts[1].param_groups[0]["lr"] == pytest.approx(lr * 0.02 / 3e-3)
    assert set_schedule(opts, 0, cfg) == 3e-3 / 4  # warmup applies to both
    assert opts[1].param_groups[0]["momentum"] == pytest.approx(0.85)
    set_schedule(opts, 5, cfg)
    assert opts[1].param_groups[0]["momentum"] == pytest.approx(0.90)
    set_schedule(opts, 10, cfg)
    assert opts[1].param_groups[0]["momentum"] == 0.95
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.02 * lr_at(10, cfg) / 3e-3)


def test_optimizer_keys_count_in_the_fingerprint_only_away_from_adamw():
    base = all_fingerprints(load_config(None))
    assert all_fingerprints(load_config(None, ["pretrain.muon_lr=0.05"])) == base  # no effect under AdamW
    muon = all_fingerprints(load_config(None, ["pretrain.optimizer=muon"]))
    assert muon["pretrain"] != base["pretrain"] and muon["tokenizer"] == base["tokenizer"]
    assert (
        all_fingerprints(load_config(None, ["pretrain.optimizer=muon", "pretrain.muon_lr=0.05"]))["pretrain"]
        != (muon["pretrain"])
    )
    with pytest.raises(ConfigError, match=r"pretrain.muon_momentum must be in \[0, 1\)"):
        load_config(None, ["pretrain.muon_momentum=1"])
    with pytest.raises(ConfigError, match=r"pretrain.optimizer: 'sgd' is not one of"):
        load_config(None, ["pretrain.optimizer=sgd"])


# ----------------------------------------------------------------------------- training and resume


class _Data:
    """A repeating random token sequence with ``TokenShards.sample_batch``'s interface (learnable quickly)."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, V, (97,), generator=g).repeat(40)

    def sample_batch(self, n: int, block: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - block - 1, (n,), generator=g)
        buf = self.tokens[starts[:, None] + torch.arange(block + 1)]  # (n, block + 1)
        return buf[:, :-1], buf[:, 1:]


def _train(tmp, name, cfg, init_seed=0, sample_fn=None, resume=False):
    torch.manual_seed(init_seed)
    model = _model()
    sd = StageDir.of(tmp / name, "pretrain")
    res = train(Accelerator(cpu=True), model, _Data(1), _Data(1), cfg, T, 0, sd, resume, sample_fn, progress=False)
    return model, res, sd


def test_muon_resume_is_bit_identical(tmp_path, fresh_accelerate):
    cfg = _muon_cfg(eval_interval=4, eval_iters=2, log_interval=2, ckpt_interval=4, muon_momentum_warmup_steps=6)
    straight, res, _ = _train(tmp_path, "straight", cfg)

    def sigterm_at_step_4(m):  # the evaluation of step 4: the loop checkpoints at this step's end and stops
        os.kill(os.getpid(), signal.SIGTERM)
        return ""

    with pytest.raises(Interrupted):
        _train(tmp_path, "resumed", cfg, sample_fn=sigterm_at_step_4)
    sd = StageDir.of(tmp_path / "resumed", "pretrain")
    ckpt = sd.latest_checkpoint()
    assert ckpt.name == "step_000004" and (ckpt / "optimizer_1.bin").is_file()  # AdamW's state and Muon's
    torch.manual_seed(123)  # other RNG state, other init: the checkpoint must restore them all
    resumed, res2, _ = _train(tmp_path, "resumed", cfg, init_seed=1, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res2.metrics["val_loss"] == res.metrics["val_loss"]


def test_muon_lowers_the_loss(tmp_path, fresh_accelerate):
    cfg = _muon_cfg(max_steps=30, lr=1e-2, min_lr=1e-3, muon_lr=0.05, eval_interval=30, log_interval=10)
    _, res, sd = _train(tmp_path, "learn", cfg)
    losses = [r["train/loss"] for r in sd.read_metrics() if "train/loss" in r]
    assert losses[0] < math.log(V) and res.metrics["val_loss"] < math.log(V) - 1.5, (losses, res.metrics)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO


def test_muon_refused_under_zero_where_pretraining_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets under zero2/zero3
    # the config loads (other stages of a Muon config run under ZeRO: `make sft LAUNCH=zero2` on configs/tiny.yaml)
    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    assert cfg.pretrain.optimizer == "muon" and cfg.pretrain.launch_problems() == [MUON_UNDER_ZERO]
    assert load_config(None).pretrain.launch_problems() == []  # AdamW is fine under ZeRO
    from stages.pretrain import main

    assert main([f"run.root={tmp_path}", "pretrain.optimizer=muon"]) == 2  # the stage, as a ZeRO launch starts it
    err = capsys.readouterr().err
    assert "pretrain.optimizer=muon cannot run under DeepSpeed ZeRO" in err and "LAUNCH=ddp" in err
    assert not any(tmp_path.iterdir())  # refused before the stage folder was made


def test_the_orchestrator_refuses_muon_under_zero_before_launching(monkeypatch, tmp_path):
    import dataclasses

    from pipeline import orchestrate
    from pipeline.orchestrate import RunOptions, run_pipeline

    launched: list[list[str]] = []
    monkeypatch.setattr(orchestrate, "_run_child", lambda cmd, *a: launched.append(cmd) or 0)
    opts = RunOptions(CONFIG_DIR / "tiny.yaml", (f"run.root={tmp_path}",), launch="zero2")
    with pytest.raises(ConfigError, match=r"pretrain.optimizer=muon cannot run under DeepSpeed ZeRO"):
        run_pipeline("all", opts)
    with pytest.raises(ConfigError, match=r"cannot run under DeepSpeed ZeRO"):
        run_pipeline("sft", dataclasses.replace(opts, launch="zero3"))  # sft needs pretraining, not yet done
    assert launched == [] and not any(tmp_path.iterdir())  # nothing launched, nothing written
    # the refusal is for a pretraining that has to run: with every stage done (faked), nothing is refused
    monkeypatch.setattr(
        orchestrate, "stage_status", lambda cfg, stage, fps: SimpleNamespace(state="done", path=tmp_path)
    )
    assert run_pipeline("sft", opts) == 0 and launched == []


def test_train_refuses_muon_under_deepspeed_before_building_anything(tmp_path):
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()))
    with pytest.raises(ConfigError, match="cannot run under DeepSpeed ZeRO"):
        train(acc, None, None, None, _muon_cfg(), T, 0, StageDir.of(tmp_path, "pretrain"), False)


# ----------------------------------------------------------------------------- dtype: auto


def test_cpu_bf16_feature_from_cpuinfo_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nflags : x\n")
    assert "amx_bf16" in cpu_flags(info) and cpu_bf16_feature(cpu_flags(info)) == "amx_bf16"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bf16_feature(cpu_flags(info)) == "avx512_bf16"
    info.write_text("flags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_feature(cpu_flags(info)) == ""
    # no /proc/cpuinfo: torch's own CPU detection answers
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert cpu_flags(tmp_path / "missing") == frozenset({"avx512_bf16"})


def test_dtype_auto_resolves_by_the_documented_rule(monkeypatch):
    # the rule: pretrain uses bf16 on CPUs with native bf16 (measured on AVX512-BF16; AMX listed with it), float32 on
    # other CPUs; other stages are float32 on every CPU; the feature is recorded all the same
    expected = {"amx_bf16": "bfloat16", "avx512_bf16": "bfloat16", "": "float32"}
    for feature, resolved in expected.items():
        c = resolve_dtype("auto", "pretrain", device="cpu", cpu_feature=feature)
        assert (c.resolved, c.cpu_bf16, c.bf16) == (resolved, feature, resolved == "bfloat16")
        assert resolve_dtype("auto", "sft", device="cpu", cpu_feature=feature).resolved == "float32"  # not listed
    none = resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="").reason
    assert none == "CPU with no native bf16; pretrain uses CPU bf16 on amx_bf16, avx512_bf16 only"
    # under DeepSpeed on a CPU: float32 (its bf16 mode keeps bf16 weights, which was not measured); GPUs are unaffected
    zero = resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="avx512_bf16", deepspeed=True)
    assert (zero.resolved, zero.cpu_bf16) == ("float32", "avx512_bf16") and "DeepSpeed" in zero.reason
    assert resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="avx512_bf16", deepspeed=False).bf16
    assert resolve_dtype("bfloat16", "pretrain", device="cpu", cpu_feature="avx512_bf16", deepspeed=True).bf16
    assert resolve_dtype("auto", "pretrain", device="cuda", cuda_bf16=True, cpu_feature="", deepspeed=True).bf16
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets under zero2/zero3
    assert resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="amx_bf16").resolved == "float32"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    # GPUs: bf16 where supported
    assert resolve_dtype("auto", "pretrain", device="cuda", cuda_bf16=True, cpu_feature="").resolved == "bfloat16"
    assert resolve_dtype("auto", "pretrain", device="cuda", cuda_bf16=False, cpu_feature="").resolved == "float32"
    # explicit values are kept; bf16 without native support says it is emulated
    slow = resolve_dtype("bfloat16", "pretrain", device="cpu", cpu_feature="")
    assert slow.bf16 and "emulated" in slow.reason
    assert resolve_dtype("float32", "pretrain", device="cuda", cuda_bf16=True, cpu_feature="").resolved == "float32"
    assert resolve_dtype("float32", "pretrain", device="cpu", cpu_feature="amx_bf16").resolved == "float32"
    # the table decides: a stage's set lists the features with which auto picks bf16
    monkeypatch.setitem(precision.CPU_AUTO_BF16, "pretrain", frozenset())
    assert resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="amx_bf16").resolved == "float32"
    monkeypatch.setitem(precision.CPU_AUTO_BF16, "pretrain", frozenset({"amx_bf16"}))
    assert resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="amx_bf16").resolved == "bfloat16"
    assert resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="avx512_bf16").resolved == "float32"
    # features come from the machine when not given (mocked here)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    rec = resolve_dtype("auto", "pretrain", device="cpu").record()
    assert rec == {
        "requested": "auto",
        "resolved": "bfloat16",
        "device": "cpu",
        "cpu_bf16": "amx_bf16",
        "reason": "CPU with native bf16 (amx_bf16); pretrain uses it on amx_bf16",
    }


@pytest.mark.parametrize("module", ["pipeline.precision", "pipeline.config.pretrain"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
