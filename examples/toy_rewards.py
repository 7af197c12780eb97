"""Reward functions for trying PPO / GRPO on the bundled story model: f(prompts, completions) -> one reward each,
named on the command line as --reward-fn examples/toy_rewards.py:NAME."""


def count_the(prompts: list[str], completions: list[str]) -> list[float]:
  """+1 per occurrence of the word "the" in the completion."""
  return [float(c.count(" the")) for c in completions]


def short_sentences(prompts: list[str], completions: list[str]) -> list[float]:
  """+1 per sentence end, -0.05 per character: prefers short sentences."""
  return [c.count(".") - 0.05 * len(c) for c in completions]
