"""Online RL: rollouts, rewards."""
