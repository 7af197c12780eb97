"""PPO and GRPO: GAE, KL-shaped rewards and group advantages against hand computations; on (part of) the bundled
model a toy reward (+1 per occurrence of a word) rises while the KL stays bounded; the first minibatch's ratio is 1;
a seeded run repeats exactly."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllama2 import Llama
from tinyllama2.train.rl import AdaptiveKL, gae, group_advantages, pack, ppo_rewards, whiten

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "tinyllama2" / "default_model"
PROMPTS = ["Once upon a time", "One day, a little girl", "Tom and Sue", "There was a big dog", "The sun was",
           "Lily wanted to", "In the park", "A boy named Tim"]
WORD = " the"


def count_word(prompts, completions):
  """The toy reward: +1 per occurrence of WORD in the completion."""
  return [c.count(WORD) for c in completions]


# ---- the formulas -------------------------------------------------------------------------------
def test_gae_matches_a_hand_computation():
  # one row: targets 1..3 are the completion (target 0 is the prompt's last token predicting it, masked out)
  mask = np.array([[0, 1, 1, 1, 0]], np.float32)
  rewards = np.array([[0, 0.1, -0.2, 1.0, 0]], np.float32)
  values = np.array([[0, 0.5, 0.4, 0.3, 0]], np.float32)
  g, lam = 0.9, 0.8
  d3 = 1.0 - 0.3                       # the last: nothing after it
  d2 = -0.2 + g * 0.3 - 0.4
  d1 = 0.1 + g * 0.4 - 0.5
  a3 = d3
  a2 = d2 + g * lam * a3
  a1 = d1 + g * lam * a2
  adv, ret = gae(rewards, values, mask, g, lam)
  np.testing.assert_allclose(adv[0], [0, a1, a2, a3, 0], rtol=1e-6)
  np.testing.assert_allclose(ret[0], [0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0], rtol=1e-6)
  w = whiten(np.array([[0, 1, 2, 3, 0]], np.float32), mask)
  assert w[0, 0] == 0 and w[0, 4] == 0 and abs(w[0, 1:4].mean()) < 1e-6 and abs(w[0, 1:4].std() - 1) < 1e-6


def test_ppo_rewards_penalise_kl_per_token_and_add_the_score_at_the_end():
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  logp = np.array([[-1, -2, -3, -4], [-1, -1, -1, -1]], np.float32)
  ref = np.array([[-1, -1.5, -3.5, -9], [-2, -1, -0.5, -1]], np.float32)
  rewards, kl = ppo_rewards(np.array([2.0, -1.0], np.float32), logp, ref, mask, kl_coef=0.1)
  np.testing.assert_allclose(kl, [[0, -0.5, 0.5, 0], [1, 0, -0.5, 0]])
  np.testing.assert_allclose(rewards, [[0, 0.05, -0.05 + 2, 0], [-0.1, 0, 0.05, -1]], rtol=1e-6)


def test_adaptive_kl_moves_towards_its_target():
  ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
  ctl.update(12.0, 10)                  # above target: the error is clipped to +0.2
  assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
  ctl.update(3.0, 10)
  assert ctl.value < 0.1 * 1.02
  fixed = AdaptiveKL(0.1)
  fixed.update(100.0, 10)
  assert fixed.value == 0.1


def test_group_advantages_have_mean_zero_and_unit_std():
  r = np.random.default_rng(0).normal(size=24).astype(np.float32) * 3
  adv = group_advantages(r, 4).reshape(6, 4)
  np.testing.assert_allclose(adv.mean(1), 0, atol=1e-6)
  np.testing.assert_allclose(adv.std(1, ddof=1), 1, atol=1e-3)
  plain = group_advantages(r, 4, scale=False).reshape(6, 4)
  np.testing.assert_allclose(plain, r.reshape(6, 4) - r.reshape(6, 4).mean(1, keepdims=True), atol=1e-6)


def test_pack_masks_the_completion_and_its_eos():
  from tinyllama2.generate import Generation
  gens = [Generation("", [7, 8], [1, 5, 6], "stop"), Generation("", [9, 9, 9], [1, 4], "length")]
  tokens, mask = pack(gens, eos_id=2, width=7, pad_id=2)
  assert tokens.tolist() == [[1, 5, 6, 7, 8, 2, 2], [1, 4, 9, 9, 9, 2, 2]]
  assert mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]]   # targets: 7, 8, EOS / 9, 9, 9


def test_rewards_add_the_reward_model_score_and_the_functions(tmp_path):
  from tinyllama2 import reward
  from tinyllama2.reward import new_score_head
  from tinyllama2.train.recipes import RLOptions, _rewards
  lm = Llama.from_pretrained(BUNDLED)
  reward.save(tmp_path / "rm", lm.model, new_score_head(lm.model, std=0.5), BUNDLED / "tokenizer.model")
  rm = Llama.from_pretrained(tmp_path / "rm")
  ids = [lm.tokenizer.encode("Once upon a time the cat", bos=True), lm.tokenizer.encode("The dog", bos=True)]
  rows = np.full((2, 10), 2, np.int32)
  for r, x in zip(rows, ids): r[:len(x)] = x
  o = RLOptions(model="", prompts="", out="", reward_fns=[count_word])
  got = _rewards(o, rm, ["", ""], ["the the", "x"], rows, np.array([len(x) for x in ids]))
  np.testing.assert_allclose(got, rm.reward(ids) + np.array([1, 0]), rtol=1e-6)


def test_reward_function_failures_are_one_line_errors():
  from tinyllama2.train.recipes import RLOptions, _rewards
  rows, lengths = np.zeros((2, 4), np.int32), np.array([4, 4])
  def broken(prompts, completions): raise KeyError("oops")
  for fn, message in ((broken, "reward function broken failed: KeyError"), (lambda p, c: [1.0], r"returned shape \(1,\)"),
                      (lambda p, c: [1.0, float("nan")], "NaN or infinite")):
    with pytest.raises(ValueError, match=message):
      _rewards(RLOptions(model="", prompts="", out="", reward_fns=[fn]), None, ["a", "b"], ["x", "y"], rows, lengths)


def test_log_probs_are_those_of_the_sampling_temperature():
  from tinygrad import Tensor
  from tinyllama2.train.rl import token_values
  lm = Llama.from_pretrained(BUNDLED)
  ids = lm.tokenizer.encode("Once upon a time there was", bos=True)
  logits = lm.logits(ids).astype(np.float64) / 0.7
  want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  got, _ = token_values(lm.model, Tensor(np.array([ids], np.int32), device=lm.model.device), temperature=0.7)
  np.testing.assert_allclose(got.numpy()[0], want[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4, atol=1e-4)


# ---- the loops on the bundled model's first two blocks --------------------------------------------
PROMPTS += ["Mom said", "The cat", "Max had a", "It was a sunny day", "Sara and Ben", "The little bird", "One night",
            "A big tree"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
  """The bundled model cut to its first two blocks: a story model still (its word statistics are there to reward),
  and a third of the compiling of six blocks."""
  from tinyllama2.checkpoint import hf
  args, weights = hf.load(BUNDLED)
  kept = {k: v for k, v in weights.items() if not k.startswith("layers.") or int(k.split(".")[1]) < 2}
  out = tmp_path_factory.mktemp("policy") / "model"
  hf.save(out, args.replace(n_layers=2), kept, tokenizer_model=BUNDLED / "tokenizer.model")
  return out


def _prompts(tmp_path: Path) -> Path:
  path = tmp_path / "prompts.json"
  path.write_text(json.dumps(PROMPTS))
  return path


PPO_FLAGS = ["--template", "plain", "--target-modules", "q_proj,v_proj,down_proj", "--prompts-per-iteration", "16",
             "--max-new-tokens", "16", "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-3",
             "--kl-coef", "0.05"]


def _metrics(out: Path) -> list[dict]:
  drop = ("rollout_s", "update_s", "tokens_per_s")
  return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rises(scores: list[float]) -> bool: return np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.2


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_with_bounded_kl_and_repeats_exactly(tmp_path, policy):
  from tinyllama2.cli import build_parser
  from tinyllama2.cli.common import rl_options
  from tinyllama2.train.recipes import PPOOptions, train_ppo
  prompts = _prompts(tmp_path)
  a = build_parser().parse_args(["ppo", "--model", str(policy), "--prompts", str(prompts), "--out", str(tmp_path / "a"),
                                 "--iterations", "12", *PPO_FLAGS])
  o = rl_options(a, PPOOptions, ppo=dict(kl_coef=0.05))
  o.reward_fns = [count_word]
  run = train_ppo(o, progress=False)
  first = run.steps[0]   # the policy still is the one that sampled: ratio 1, nothing clipped
  assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
  assert first["policy/approxkl"] < 1e-9 and first["policy/clipfrac"] == 0.0
  rows = _metrics(tmp_path / "a")
  scores = [r["objective/scores"] for r in rows]
  print("PPO scores by iteration:", scores, "KL:", [round(r["objective/kl"], 2) for r in rows])
  assert _rises(scores), scores
  assert all(r["objective/kl"] < 20 for r in rows)
  assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
  # the first iterations again, the reward function named by file as on the command line: the same numbers
  fn = tmp_path / "toy_reward.py"
  fn.write_text(f"def count_word(prompts, completions): return [c.count({WORD!r}) for c in completions]\n")
  again = build_parser().parse_args(["ppo", "--model", str(policy), "--prompts", str(prompts), "--out", str(tmp_path / "b"),
                                     "--reward-fn", f"{fn}:count_word", "--iterations", "3", *PPO_FLAGS])
  train_ppo(rl_options(again, PPOOptions, ppo=dict(kl_coef=0.05)), progress=False)
  assert _metrics(tmp_path / "b") == rows[:3]


@pytest.mark.slow
def test_grpo_raises_a_toy_reward(tmp_path, policy):
  from tinyllama2.train.recipes import GRPOOptions, train_grpo
  o = GRPOOptions(model=str(policy), prompts=str(_prompts(tmp_path)), out=str(tmp_path / "g"), reward_fns=[count_word],
                  template="plain", target_modules=["q_proj", "v_proj", "down_proj"], iterations=12,
                  prompts_per_iteration=4, max_new_tokens=16, train=dict(batch_size=8, lr=5e-3, min_lr=5e-3),
                  grpo=dict(num_generations=4, beta=0.04))
  run = train_grpo(o, progress=False)
  assert run.steps[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5) and run.steps[0]["clip_ratio"] == 0.0
  rows = _metrics(tmp_path / "g")
  scores = [r["objective/scores"] for r in rows]
  print("GRPO scores by iteration:", scores)
  assert _rises(scores), scores
  assert all(r["objective/kl"] < 20 for r in rows)


def test_rl_refuses_bad_settings(tmp_path):
  from tinyllama2.train.recipes import GRPOOptions, PPOOptions, train_grpo, train_ppo
  prompts = _prompts(tmp_path)
  with pytest.raises(ValueError, match="no reward"):
    train_ppo(PPOOptions(model=str(BUNDLED), prompts=str(prompts), out=str(tmp_path / "x")), progress=False)
  with pytest.raises(ValueError, match="num-generations must be at least 2"):
    train_grpo(GRPOOptions(model=str(BUNDLED), prompts=str(prompts), out=str(tmp_path / "y"), reward_fns=[count_word],
                           grpo=dict(num_generations=1)), progress=False)
  with pytest.raises(ValueError, match="minibatches"):
    train_ppo(PPOOptions(model=str(BUNDLED), prompts=str(prompts), out=str(tmp_path / "z"), reward_fns=[count_word],
                         prompts_per_iteration=6, train=dict(batch_size=4)), progress=False)
  r = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "grpo", "--model", str(BUNDLED), "--prompts", str(prompts),
                      "--out", str(tmp_path / "w"), "--reward-fn", "no_such_module:f"], capture_output=True, text=True,
                     timeout=300, cwd=ROOT)
  assert r.returncode == 1 and "cannot import no_such_module" in r.stderr and "Traceback" not in r.stderr
