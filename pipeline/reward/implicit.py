"""A reward model that judges through the language-model head: DPO's implicit reward.

``reward.objective=dpo`` trains a causal LM ``pi`` from the reward stage's init model (the SFT model, which stays
frozen as the reference ``pi_ref``) with the DPO loss (:func:`pipeline.reward.losses.dpo_loss`) on the same
preference pairs a Bradley-Terry reward model trains on (Rafailov et al. 2023, eqn. 7). The reward of a response is
the implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``, summed over the response tokens (the end-of-turn
token included), the quantity DPO ranks responses by. Why a second kind: a last-token scalar head the size of the
policy does not learn to check a sum on held-out items (bench/RESULTS.md), while the same network's LM head,
trained on the same pairs, ranks them far better.

The artifact (``runs/<run>/reward/artifact``) is then the trained causal LM and its tokenizer, the frozen reference
in ``reference/``, and ``implicit_reward.json`` (``{"kind": "dpo", "beta": ...}``). :func:`load_implicit_reward`
loads it as an :class:`ImplicitReward`, a :class:`~pipeline.reward.scorer.RewardScorer`. It cannot start a value
model (there is no scalar head): with ``ppo.advantage=gae`` PPO's value model starts from the policy with a new
scalar head instead (``pipeline.rl.components.load_models``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.lm import (
    context_length,
    ensure_end_token,
    eval_mode,
    response_logprobs,
    right_pad,
    sequence_logprobs,
    stop_token_ids,
)
from pipeline.tokenizer import ensure_chat_tokens

from .scorer import encode_prompt_response

__all__ = [
    "IMPLICIT_CONFIG",
    "REFERENCE_DIR",
    "ImplicitReward",
    "is_implicit_reward_dir",
    "load_implicit_reward",
    "save_implicit_reward",
    "summed_logprobs",
]

log = logging.getLogger(__name__)

IMPLICIT_CONFIG = "implicit_reward.json"
REFERENCE_DIR = "reference"


@torch.no_grad()
def summed_logprobs(model: Any, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """Summed response log-probs ``(N,)`` (CPU) of ``(token ids, response start)`` pairs, ``batch_size`` at a time,
    right-padded on the model's device; the model's train/eval mode is restored."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            ids, mask = right_pad([e for e, _ in chunk], pad_id)
            starts = torch.tensor([s for _, s in chunk], device=device)
            out.append(sequence_logprobs(model, ids.to(device), mask.to(device), starts).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class ImplicitReward:
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` of a DPO-trained causal LM ``model`` and its reference.

    Args:
        model: the DPO-trained causal LM.
        reference: the frozen model the DPO reference log-probs came from.
        beta: DPO's beta.
        tokenizer: the shared tokenizer, with the chat template.
        stop_ids: ids that end a response, the end-of-turn token first (default: the tokenizer's).
        pad_id: the padding id of the responses it scores (default: the tokenizer's).
    """

    kind = "implicit"
    normalised = False
    trains_critic = False

    def __init__(self, model: Any, reference: Any, beta: float, tokenizer: Any,
                 stop_ids: list[int] | None = None, pad_id: int | None = None) -> None:  # fmt: skip
        self.model, self.reference, self.beta, self.tokenizer = model, reference, float(beta), tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id if pad_id is None else pad_id)
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Both models to ``device`` (and ``dtype`` when given); :meth:`score_ids` moves its inputs there."""
        self.model.to(device=device, dtype=dtype)
        self.reference.to(device=device, dtype=dtype)

    def prepare_for_rl(self) -> None:
        """Nothing to do: both models load frozen, in eval mode. Their GELU is left unfused (PPO fuses the networks
        it trains and the scalar reward model), as the default run's measured numbers were made."""

    def score_texts(self, prompts: list[Any], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Implicit rewards ``(N,)`` (float32, CPU) of (prompt, response) pairs rendered by the chat template; a
        sequence longer than the context keeps its last tokens, with a warning."""
        if len(prompts) != len(responses):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
        encoded = [encode_prompt_response(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        ctx = context_length(self.model)
        if ctx and any(len(ids) > ctx for ids, _ in encoded):
            log.warning("score_texts: %d sequences longer than %d tokens keep their last %d",
                        sum(len(ids) > ctx for ids, _ in encoded), ctx, ctx)  # fmt: skip
            encoded = [(ids[-ctx:], max(1, start - (len(ids) - ctx))) if len(ids) > ctx else (ids, start)
                       for ids, start in encoded]  # fmt: skip
        lp = summed_logprobs(self.model, encoded, self.pad_token_id, batch_size)
        ref = summed_logprobs(self.reference, encoded, self.pad_token_id, batch_size)
        return (self.beta * (lp - ref)).float()

    @torch.no_grad()
    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Implicit rewards ``(B,)`` (float32, on the models' device) in PPO's rollout layout; a response that did
        not end gets the end-of-turn token first, as the reward model's training pairs had it."""
        ids, mask = ensure_end_token(response_ids, response_mask, self.stop_ids, self.pad_token_id)
        dev = next(self.model.parameters()).device
        t = [x.to(dev) for x in (query_ids, query_mask, ids, mask)]
        lp = response_logprobs(self.model, *t).float()
        ref = response_logprobs(self.reference, *t).float()
        return self.beta * (lp - ref).sum(1)


def is_implicit_reward_dir(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an implicit (DPO) reward model, i.e. has ``implicit_reward.json``."""
    return (Path(model_dir) / IMPLICIT_CONFIG).is_file()


def save_implicit_reward(out_dir: str | Path, reference: Any, beta: float, tokenizer: Any) -> None:
    """Complete an artifact whose trained LM is already saved in ``out_dir``: save ``reference`` (the frozen
    model the reference log-probs came from) into ``out_dir/reference`` and write ``implicit_reward.json``
    (main process only)."""
    out = Path(out_dir)
    reference.save_pretrained(str(out / REFERENCE_DIR))
    tokenizer.save_pretrained(str(out / REFERENCE_DIR), save_jinja_files=False)
    (out / IMPLICIT_CONFIG).write_text(json.dumps({"kind": "dpo", "beta": beta, "reference": REFERENCE_DIR}, indent=2))


def load_implicit_reward(model_dir: str | Path, trust_remote_code: bool = False, stop_ids: list[int] | None = None,
                         pad_id: int | None = None) -> ImplicitReward:  # fmt: skip
    """The :class:`ImplicitReward` in ``model_dir`` (float32, eval mode, no gradients).

    Raises:
        ValueError: ``implicit_reward.json`` is not a valid description (names the file and field).
    """
    path = Path(model_dir) / IMPLICIT_CONFIG
    try:
        spec = json.loads(path.read_text())
        beta, ref_name = float(spec["beta"]), str(spec.get("reference", REFERENCE_DIR))
        if spec.get("kind", "dpo") != "dpo":
            raise ValueError(f"kind {spec.get('kind')!r} is not 'dpo'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid implicit reward description ({e})") from None
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    ensure_chat_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(Path(model_dir) / ref_name), **kw).eval()
    for m in (model, reference):
        m.requires_grad_(False)
    return ImplicitReward(model, reference, beta, tokenizer, stop_ids, pad_id)
