"""What a stage's ``dtype: auto`` means on this machine: the CPU's native bf16 support, and one rule per stage.

    choice = resolve_dtype(cfg.pretrain.dtype, "pretrain")   # DtypeChoice(requested="auto", resolved="bfloat16", ...)
    Accelerator(mixed_precision="bf16" if choice.bf16 else "no")

The rule for ``auto``:

- on a CUDA GPU: bf16 autocast when the GPU supports it (``torch.cuda.is_bf16_supported()``), else float32;
- on a CPU: bf16 autocast when the CPU has a native bf16 feature that :data:`CPU_AUTO_BF16` lists for the stage
  (``amx_bf16``: Intel AMX tiles, Sapphire Rapids and later; ``avx512_bf16``: AVX512-BF16 dot products, Cooper
  Lake, Zen 4 and later), else float32. A stage lists the features only once a measurement shows bf16 reaching
  the same loss sooner there: today pretraining, measured on AVX512-BF16 without AMX (an AMD EPYC, Zen 4 or later;
  ``bench/time_to_loss.py --shape default``: 14-16% faster per step at an equal final loss, ``bench/RESULTS.md``).
  CPUs with AMX also have AVX512-BF16 and oneDNN's bf16 matmuls use their tiles, so they are listed too, without a
  measurement of their own. Every other stage is float32 on CPUs;
- on a CPU under a DeepSpeed launch: float32. The measurement is of autocast over float32 weights in one process;
  DeepSpeed's bf16 mode keeps the weights themselves in bf16, which is not measured.

``float32`` and ``bfloat16`` are taken as written (bf16 on a CPU without a native bf16 feature is emulated, and
slow: the choice's ``reason`` says so). The stage logs :meth:`DtypeChoice.describe` and records
:meth:`DtypeChoice.record` in its manifest.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.provenance import deepspeed_launch

__all__ = ["CPU_BF16_FEATURES", "CPU_AUTO_BF16", "DtypeChoice", "cpu_flags", "cpu_bf16_feature", "resolve_dtype"]

log = logging.getLogger(__name__)

CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
"""Native CPU bf16 features, best first (the names of the ``flags`` line of ``/proc/cpuinfo``)."""

CPU_AUTO_BF16: dict[str, frozenset[str]] = {"pretrain": frozenset({"amx_bf16", "avx512_bf16"})}
"""Per stage, the CPU bf16 features with which ``dtype: auto`` picks bf16 autocast on a CPU (pretraining: measured
faster to a given loss on AVX512-BF16; AMX listed with it, not measured on its own). A stage not listed, or a feature
not in its set, is float32."""


@dataclass(frozen=True)
class DtypeChoice:
    """What ``dtype`` resolved to, and why."""

    requested: str
    """The config value: ``auto``, ``float32`` or ``bfloat16``."""
    resolved: str
    """``float32`` or ``bfloat16`` (bf16 autocast, float32 weights)."""
    device: str
    """``cuda`` or ``cpu``."""
    cpu_bf16: str
    """The CPU's best native bf16 feature (``amx_bf16``, ``avx512_bf16``) or ``""``; recorded on GPUs too."""
    reason: str

    @property
    def bf16(self) -> bool:
        return self.resolved == "bfloat16"

    def describe(self) -> str:
        return f"dtype {self.requested} -> {self.resolved} on {self.device}: {self.reason}"

    def record(self) -> dict[str, Any]:
        """The manifest's ``dtype`` field."""
        return asdict(self)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags: ``/proc/cpuinfo``'s first ``flags`` line (Linux x86), else those torch's CPU
    detection reports true; empty when neither answers."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    # private (torch 2.x): a dict of feature name -> bool, the names as in /proc/cpuinfo
    detect = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    caps = detect() if detect is not None else {}
    return frozenset(k for k, v in caps.items() if v is True)


def cpu_bf16_feature(flags: frozenset[str] | None = None) -> str:
    """The best native bf16 feature in ``flags`` (default: :func:`cpu_flags`), or ``""``.

    >>> cpu_bf16_feature(frozenset({"avx2", "avx512_bf16"})), cpu_bf16_feature(frozenset({"avx2"}))
    ('avx512_bf16', '')
    """
    flags = cpu_flags() if flags is None else flags
    return next((f for f in CPU_BF16_FEATURES if f in flags), "")


def resolve_dtype(
    requested: str,
    stage: str,
    device: str | None = None,
    cuda_bf16: bool | None = None,
    cpu_feature: str | None = None,
    deepspeed: bool | None = None,
) -> DtypeChoice:
    """Resolve a stage's ``dtype`` by the rule of the module docstring.

    Args:
        requested: ``auto``, ``float32`` or ``bfloat16``.
        stage: the stage whose :data:`CPU_AUTO_BF16` rule applies.
        device: ``cuda`` or ``cpu`` (default: ``cuda`` when torch sees a GPU).
        cuda_bf16: whether the GPU supports bf16 (default: asked of torch).
        cpu_feature: the CPU's native bf16 feature (default: :func:`cpu_bf16_feature`); ``""`` for none.
        deepspeed: whether this process runs under DeepSpeed (default: :func:`pipeline.provenance.deepspeed_launch`).

    >>> resolve_dtype("auto", "pretrain", device="cpu", cpu_feature="amx_bf16").resolved
    'bfloat16'
    >>> resolve_dtype("auto", "sft", device="cpu", cpu_feature="avx512_bf16").resolved
    'float32'
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    feature = cpu_bf16_feature() if cpu_feature is None else cpu_feature
    native = f"native bf16 ({feature})" if feature else "no native bf16"
    if requested != "auto":
        slow = device == "cpu" and requested == "bfloat16" and not feature
        reason = "as configured" + (" (this CPU has no native bf16: emulated, slow)" if slow else "")
        return DtypeChoice(requested, requested, device, feature, reason)
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        reason = "the GPU supports bf16" if ok else "the GPU has no bf16"
        return DtypeChoice(requested, "bfloat16" if ok else "float32", device, feature, reason)
    allowed = CPU_AUTO_BF16.get(stage, frozenset())
    if feature and feature in allowed:
        if deepspeed_launch() if deepspeed is None else deepspeed:
            reason = f"CPU with {native}; under DeepSpeed float32 (its bf16 mode keeps bf16 weights: not measured)"
            return DtypeChoice(requested, "float32", device, feature, reason)
        return DtypeChoice(requested, "bfloat16", device, feature, f"CPU with {native}; {stage} uses it on {feature}")
    why = f"{stage} uses CPU bf16 on {', '.join(sorted(allowed))} only" if allowed else f"{stage} is float32 on CPUs"
    return DtypeChoice(requested, "float32", device, feature, f"CPU with {native}; {why}")
