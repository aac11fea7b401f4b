"""How much held-out greedy accuracy does a model lose to a change with no direction at all?

PPO's first steps lower the SFT model's held-out checker accuracy even when the reward is the checker itself
(bench/RESULTS.md, "PPO's early loss"). This measures the floor of that effect: every floating-point weight
tensor ``w`` gets ``sigma * std(w) * N(0, 1)`` noise (``--seeds`` draws per sigma), and the greedy answers to the
held-out prompts (``ppo_eval``) are checked again. Where right answers flip to wrong more often than wrong to
right, greedy accuracy is a local maximum that any update must climb out of with a real signal.

    python bench/greedy_perturbation.py runs/tiny/sft/artifact --sigmas 0.01,0.03,0.1
    python bench/greedy_perturbation.py SFT --config configs/tiny.yaml 'data.tasks.kinds=[add]' data.tasks.max_operand=19

Draw ``i`` of every sigma uses seed ``i``: the noise directions are the same across sigmas, only scaled. Answers
are up to ``--max-new-tokens`` (16) tokens, like the PPO stage's held-out evaluation with ``configs/tiny.yaml``.

Prints one line per draw (accuracy, answers changed, right->wrong, wrong->right) and a markdown row per sigma
(the counts summed over its draws).
"""

from __future__ import annotations

import argparse

import torch
from task_args import add_task_arguments, task_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sft", help="model folder (runs/<run>/sft/artifact)")
    ap.add_argument("--sigmas", default="0.01,0.03,0.1", help="noise scales, relative to each tensor's std")
    ap.add_argument("--seeds", type=int, default=4, help="draws per sigma")
    add_task_arguments(ap)
    a = ap.parse_intermixed_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.tasks import check_answer
    from pipeline.lm import generate_responses

    records = task_records(a, "ppo_eval")
    prompts = [r["prompt"] for r in records]
    tok = AutoTokenizer.from_pretrained(a.sft)
    model = AutoModelForCausalLM.from_pretrained(a.sft).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def answer() -> tuple[list[str], list[bool]]:
        answers = generate_responses(model, tok, prompts, a.max_new_tokens, batch_size=50)
        return answers, [check_answer(r, x) for r, x in zip(records, answers)]

    base_answers, base = answer()
    acc0 = sum(base) / len(base)
    print(f"unperturbed: accuracy {acc0:.3f} on {len(base)} held-out prompts")
    rows = []
    for sigma in (float(s) for s in a.sigmas.split(",")):
        accs, to_wrong, to_right, changed = [], 0, 0, 0
        for seed in range(a.seeds):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for k, p in model.state_dict().items():
                    if p.dtype.is_floating_point and p.dim() > 0:
                        p.copy_(original[k] + sigma * original[k].std() * torch.randn(p.shape, generator=g))
            answers, now = answer()
            ch = sum(x != y for x, y in zip(base_answers, answers))
            rw = sum(b and not n for b, n in zip(base, now))
            wr = sum(n and not b for b, n in zip(base, now))
            accs.append(sum(now) / len(now))
            to_wrong, to_right, changed = to_wrong + rw, to_right + wr, changed + ch
            print(f"sigma {sigma} seed {seed}: accuracy {accs[-1]:.3f}, {ch} answers changed, right->wrong {rw}, "
                  f"wrong->right {wr}")  # fmt: skip
        mean = sum(accs) / len(accs)
        rows.append(
            f"| {sigma} | {a.seeds} | {mean:.3f} ({min(accs):.3f}..{max(accs):.3f}) | {100 * (mean - acc0):+.1f} "
            f"| {changed} | {to_wrong} | {to_right} |"
        )
    model.load_state_dict(original)
    print(
        f"\n| sigma | draws | accuracy (min..max) | change (points; unperturbed {acc0:.3f}) | changed | right->wrong | wrong->right |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
