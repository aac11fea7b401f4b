"""How much can RL raise held-out checker accuracy, and can the reward model tell right from wrong?

For each task kind of the generated held-out prompts (``ppo_eval``), from ``--samples`` responses sampled at
temperature 1 from the SFT model plus its greedy answer:

- ``greedy``: checker accuracy of the greedy answer (what the run report measures);
- ``sampled``: mean accuracy of the samples;
- ``pass@k``: share of prompts with at least one right sample: the ceiling of what sharpening the SFT
  policy toward its own right answers can reach; ``pass@k - greedy`` is the headroom for PPO;
- ``rm_best_of_k``: accuracy of the sample the reward model scores highest (best-of-k with the RM);
- ``rm_auc``: on prompts with both right and wrong samples, how often the reward model scores a right
  sample above a wrong one (0.5 is chance).

    python bench/rl_headroom.py runs/tiny/sft/artifact runs/tiny/reward/artifact --samples 8
    python bench/rl_headroom.py SFT RM --config configs/tiny.yaml data.tasks.max_operand=19   # other tasks

Prints one table row per task kind (markdown) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sft", help="SFT model folder (runs/<run>/sft/artifact)")
    ap.add_argument("reward", help="reward model folder (runs/<run>/reward/artifact)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (k)")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="configs/tiny.yaml", help="run config whose data.tasks made the models")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.tasks.max_operand=19")
    a = ap.parse_intermixed_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.data.tasks import check_answer, generate_tasks
    from pipeline.evaluate import generate_responses
    from pipeline.reward import load_reward_model, score_texts

    records = generate_tasks(load_config(a.config, a.overrides).data.tasks).ppo_eval[: a.n]
    tok = AutoTokenizer.from_pretrained(a.sft)
    policy = AutoModelForCausalLM.from_pretrained(a.sft).eval()
    rm, rm_tok = load_reward_model(a.reward)
    prompts = [r["prompt"] for r in records]
    k = a.samples
    greedy = generate_responses(policy, tok, prompts, a.max_new_tokens, batch_size=100)
    many = [p for p in prompts for _ in range(k)]
    sampled = generate_responses(
        policy, tok, many, a.max_new_tokens, batch_size=200, do_sample=True, temperature=1.0, seed=a.seed
    )
    scores = score_texts(rm, rm_tok, many, sampled, 200).tolist()

    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for i, rec in enumerate(records):
        ok = [check_answer(rec, r) for r in sampled[i * k : (i + 1) * k]]
        sc = scores[i * k : (i + 1) * k]
        for key in (rec["task"], "all"):
            s = acc[key]
            s["n"] += 1
            s["greedy"] += check_answer(rec, greedy[i])
            s["sampled"] += sum(ok) / k
            s["pass"] += any(ok)
            s["best"] += ok[max(range(k), key=lambda j: sc[j])]
            right = [x for x, o in zip(sc, ok) if o]
            wrong = [x for x, o in zip(sc, ok) if not o]
            s["auc_pairs"] += len(right) * len(wrong)
            s["auc_wins"] += sum((g > b) + 0.5 * (g == b) for g in right for b in wrong)
            s["mixed"] += bool(right and wrong)

    print(
        f"| task | n | greedy | sampled | pass@{k} | headroom (pass@{k} - greedy) | rm_best_of_{k} | rm_auc (prompts) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for task in sorted(acc, key=lambda t: (t == "all", t)):
        s = acc[task]
        n = s["n"]
        auc = (
            f"{s['auc_wins'] / s['auc_pairs']:.3f} ({int(s['mixed'])})" if s["auc_pairs"] else f"- ({int(s['mixed'])})"
        )
        print(
            f"| {task} | {int(n)} | {s['greedy'] / n:.3f} | {s['sampled'] / n:.3f} | {s['pass'] / n:.3f} | "
            f"{(s['pass'] - s['greedy']) / n:+.3f} | {s['best'] / n:.3f} | {auc} |"
        )


if __name__ == "__main__":
    main()
