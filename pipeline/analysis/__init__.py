"""Analysis of what the stages produced: checker accuracy, best-of-k, reward model vs checker agreement.

The stages call these through one function each and record the metrics they return; the report and ``bench/``
format them. Nothing here trains anything.

- :mod:`pipeline.analysis.checker`: which records have a checker, checker accuracy and its 95% Wilson interval;
- :mod:`pipeline.analysis.best_of_k`: the reward model's pick among a policy's samples against greedy decoding;
- :mod:`pipeline.analysis.controls`: the gate before PPO, and PPO against the strongest control (SFT greedy, the
  reward model's best of k, the DPO policy);
- :mod:`pipeline.analysis.agreement`: where the reward model and the checker disagree, and the markdown tables.
"""
