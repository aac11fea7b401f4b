"""How much can RL raise held-out checker accuracy, and can the reward model tell right from wrong?

For each task kind of the generated held-out prompts (``ppo_eval``; ``--split ppo_train``: PPO's training
prompts), from ``--samples`` responses sampled at temperature 1 from the SFT model plus its greedy answer:

- ``greedy``: checker accuracy of the greedy answer (what the run report measures);
- ``sampled``: mean accuracy of the samples;
- ``pass@k``: share of prompts with at least one right sample: the ceiling of what sharpening the SFT
  policy toward its own right answers can reach; ``pass@k - greedy`` is the headroom for PPO;
- reward model's best of k: accuracy of the sample the reward model scores highest; not above ``greedy``,
  PPO against this reward model has no gain to find;
- right-vs-wrong AUC: on prompts with both right and wrong samples, how often the reward model scores a right
  sample above a wrong one (0.5 is chance).

    python bench/rl_headroom.py runs/tiny/sft/artifact runs/tiny/reward/artifact --samples 8
    python bench/rl_headroom.py SFT RM --config configs/tiny.yaml data.tasks.max_operand=19   # other tasks

Prints a markdown table (one row per task kind and ``all``) and a one-line reading of it, for
bench/RESULTS.md. The reward stage runs the same check
(:func:`pipeline.analysis.best_of_k.best_of_k`) on its held-out prompts and the run report shows it.
"""

from __future__ import annotations

import argparse

import torch
from task_args import add_task_arguments, task_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sft", help="SFT model folder (runs/<run>/sft/artifact)")
    ap.add_argument("reward", help="reward model folder (runs/<run>/reward/artifact)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (k)")
    ap.add_argument(
        "--split",
        choices=("ppo_eval", "ppo_train"),
        default="ppo_eval",
        help="held-out prompts (what the report measures) or PPO's training prompts (what PPO optimises on)",
    )
    ap.add_argument("--seed", type=int, default=1)
    add_task_arguments(ap)
    a = ap.parse_intermixed_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.analysis.best_of_k import format_best_of_k
    from pipeline.analysis.diagnostics import policy_best_of_k
    from pipeline.reward import load_scorer

    records = task_records(a, a.split)
    tok = AutoTokenizer.from_pretrained(a.sft)
    policy = AutoModelForCausalLM.from_pretrained(a.sft).eval()
    scorer = load_scorer(a.reward)  # scores text with its own tokenizer
    table = policy_best_of_k(policy, scorer, tok, records, a.samples, a.max_new_tokens, batch_size=200, seed=a.seed)
    if table is None:
        raise SystemExit("no prompt has a task checker")
    print("\n".join(format_best_of_k(table, a.samples)))


if __name__ == "__main__":
    main()
