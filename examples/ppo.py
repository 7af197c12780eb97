"""RLHF with PPO: sample completions, score them (a reward model or reward functions), update a LoRA policy under a
KL penalty to the model it started from; it prints how the score and the KL moved.

  python examples/ppo.py --model tinyllama2/default_model --prompts examples/story_prompts.json --template plain \
      --reward-fn examples/toy_rewards.py:count_the --iterations 20 --prompts-per-iteration 16 --max-new-tokens 24 \
      --lr 3e-3 --target-modules q_proj,v_proj,down_proj --out runs/ppo
With a reward model from examples/reward_model.py (`tinyllama2 rm`): --reward-model runs/rm/model.
"""
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, ppo, run_cli


def main() -> int:
  p = ArgParser(description="PPO of a LoRA policy against a reward")
  ppo.add_args(p)
  add_debug_flag(p)
  return run_cli(ppo.main, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
