"""The math of a step, as functions of tensors: GRPO's advantages, log-probs, surrogate and loss aggregations
(grpo), SFT's loss (sft), torch optimizers from the registry (optimizers), and the optimizer probe (probe).
May import `rollout`, `models`, `tasks`, `config`, `runtime`; never the loop or the run folder."""
