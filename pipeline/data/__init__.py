"""The data: the pretraining corpus (``corpus``) and its token shards (``shards``); the generated tasks
(``tasks``); SFT conversations, PPO prompts and ranked responses (``conversations``, ``prompts``,
``preferences``), read by ``records`` and split into training and held-out records by one ``loader``."""
