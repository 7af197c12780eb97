"""GRPO: sample a group of completions per prompt, score them (reward functions or a reward model), update a LoRA
policy with advantages relative to the group; it prints how the score and the KL moved.

  python examples/grpo.py --model tinyllama2/default_model --prompts examples/story_prompts.json --template plain \
      --reward-fn examples/toy_rewards.py:count_the --iterations 20 --prompts-per-iteration 4 --num-generations 4 --max-new-tokens 24 \
      --lr 5e-3 --target-modules q_proj,v_proj,down_proj --out runs/grpo
With a reward model from examples/reward_model.py (`tinyllama2 rm`): --reward-model runs/rm/model.
"""
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, grpo, run_cli


def main() -> int:
  p = ArgParser(description="GRPO of a LoRA policy on rewards")
  grpo.add_args(p)
  add_debug_flag(p)
  return run_cli(grpo.main, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
