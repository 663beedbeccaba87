"""Online RL's host side: prompts (`prompts`), reward functions in TRL's signature (`rewards`,
`builtin_rewards`) and the rollout batch source (`rollout`). The losses are in
`jaxpost.losses.rl`; the algorithm (`algorithm: grpo`) in `jaxpost.algorithms.grpo`."""
