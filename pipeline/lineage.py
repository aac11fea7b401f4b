"""Stage fingerprints: which config sections and upstream stages each stage depends on.

Fingerprint = hash(this stage's resolved config sections + its inputs' fingerprints). The code
revision is recorded in the manifest, not hashed: a new commit does not invalidate finished stages.
A stage that starts from an external model (``init_from``) does not depend on the upstream stage.
"""

from __future__ import annotations

from .config import RunConfig, fingerprint

__all__ = ["stage_inputs", "stage_sections", "all_fingerprints", "UPSTREAM"]

UPSTREAM: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "pretrain": ("tokenizer",),
    "sft": ("pretrain",),
    "reward": ("sft",),
    "ppo": ("sft", "reward"),
    "export": ("ppo",),
}


def stage_inputs(cfg: RunConfig, stage: str) -> tuple[str, ...]:
    """The upstream stages ``stage`` consumes under this config."""
    if stage == "pretrain" and cfg.pretrain.init_from and cfg.tokenizer.kind == "gpt2":
        return ("tokenizer",)
    if stage == "sft" and cfg.sft.init_from:
        return ()
    if stage == "reward" and cfg.reward.init_from:
        return ()
    if stage == "ppo":
        ups = []
        if not cfg.ppo.policy_from:
            ups.append("sft")
        if not cfg.ppo.reward_from:
            ups.append("reward")
        return tuple(ups)
    if stage == "export":
        return (cfg.export.source,)
    return UPSTREAM[stage]


def stage_sections(cfg: RunConfig, stage: str) -> tuple:
    """The config values ``stage``'s fingerprint hashes (the ``report:`` section is in none: it judges runs)."""
    seed = cfg.run.seed
    if stage == "tokenizer":
        return (seed, cfg.tokenizer, cfg.data.corpus)
    if stage == "pretrain":
        return (seed, cfg.model, cfg.pretrain, cfg.data.corpus)
    if stage == "sft":
        return (seed, cfg.sft, cfg.data.tasks)
    if stage == "reward":
        return (seed, cfg.reward, cfg.data.tasks)
    if stage == "ppo":
        return (seed, cfg.ppo, cfg.data.tasks)
    if stage == "export":
        # where the export is written does not change what it is
        return (cfg.export.source, cfg.export.dtype, cfg.export.max_shard_size, cfg.export.license)
    raise KeyError(stage)


def all_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Every stage's fingerprint, upstream first (each hashes its sections and its inputs' fingerprints)."""
    fps: dict[str, str] = {}
    for stage in UPSTREAM:
        fps[stage] = fingerprint(*stage_sections(cfg, stage), *[fps[u] for u in stage_inputs(cfg, stage)])
    return fps
