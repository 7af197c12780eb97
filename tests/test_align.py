"""Alignment: preference data, the reward model (Bradley-Terry loss, gradients, a learnable rule, Hugging Face's
LlamaForSequenceClassification reading it) and DPO (losses against numpy, policy = reference, a learnable preference,
resume)."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tinygrad import Context, Tensor

from tinyllama2 import Llama, ModelArgs, Transformer
from tinyllama2.checkpoint import hf
from tinyllama2.reward import last_token_scores, new_score_head
from tinyllama2.tokenizer import Llama2ChatTemplate, Tokenizer
from tinyllama2.train.data import preference_pairs, preference_record
from tinyllama2.train.losses import dpo_loss, reward_loss

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "tinyllama2" / "default_model"
TOKENIZER = BUNDLED / "tokenizer.model"
PREFERENCE = SHARED / "preference"


# ---- data ---------------------------------------------------------------------------------------
def _write(path: Path, records: list) -> Path:
  path.write_text(json.dumps(records, ensure_ascii=False))
  return path


def _weighted_text(tok: Tokenizer, tokens: np.ndarray, weights: np.ndarray) -> str:
  return tok.decode([int(t) for t, w in zip(tokens[1:], weights) if w])


def test_preference_formats_weigh_only_the_final_answer(tmp_path):
  tok = Tokenizer(TOKENIZER)
  user = [{"role": "user", "content": "Tell me a story."}]
  history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] + user
  records = [
    {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " a dog ran."},              # trl, text
    {"prompt": user, "chosen": [{"role": "assistant", "content": "A cat."}],                              # trl, chat
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"chosen": history + [{"role": "assistant", "content": "A cat."}],                                    # implicit
     "rejected": history + [{"role": "assistant", "content": "No."}]},
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Tell me a story."}],
     "chosen": {"from": "gpt", "value": "A cat."}, "rejected": {"from": "gpt", "value": "No."}},      # LLaMA-Factory
  ]
  pairs = preference_pairs(_write(tmp_path / "p.json", records), tok, 96)
  assert len(pairs) == 4
  wanted = [("there was a cat.", "a dog ran."), ("A cat.", "No."), ("A cat.", "No."), ("A cat.", "No.")]
  for i, (good, bad) in enumerate(wanted):
    # only the last answer (and its EOS, which decodes to nothing) is weighted; the history is not
    assert _weighted_text(tok, pairs.chosen.tokens[i], pairs.chosen.weights[i]).strip() == good
    assert _weighted_text(tok, pairs.rejected.tokens[i], pairs.rejected.weights[i]).strip() == bad
    assert pairs.chosen.tokens[i][pairs.chosen_last[i]] == tok.eos_id
  # the chat records render the prompt with the template: the tokens before the answer are its prompt ids
  head = Llama2ChatTemplate().encode(history, tok)
  assert pairs.chosen.tokens[2][:len(head)].tolist() == head
  system = Llama2ChatTemplate().encode([{"role": "system", "content": "Be kind."}] + user, tok)
  assert pairs.rejected.tokens[3][:len(system)].tolist() == system


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_llama_factory_preference_demos_load(name):
  path = PREFERENCE / name
  if not path.is_file(): pytest.skip(f"shared test data not found: {path}")
  tok = Tokenizer(TOKENIZER)
  with pytest.warns(UserWarning):   # the long multi-turn records do not fit 256 tokens
    pairs = preference_pairs(path, tok, 256, limit=40)
  assert 0 < len(pairs) <= 40
  assert (pairs.chosen.weights.sum(1) > 0).all() and (pairs.rejected.weights.sum(1) > 0).all()
  assert not np.array_equal(pairs.chosen.tokens, pairs.rejected.tokens)


@pytest.mark.parametrize("record, message", [
  ({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
  ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list of messages"),
  ({"prompt": "x", "chosen": {"from": "gpt"}, "rejected": "b"}, "'chosen' must be a string"),
  ({"chosen": "a b", "rejected": "a c"}, "must be message lists"),
  ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "differ only"),
  ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
])
def test_malformed_preference_records_are_named(tmp_path, record, message):
  path = _write(tmp_path / "bad.json", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, record])
  with pytest.raises(ValueError, match=r"bad.json record 1: .*" + message.replace("(", r"\(").replace(")", r"\)")):
    preference_pairs(path, Tokenizer(TOKENIZER), 32)


def test_preference_record_margin():
  assert preference_record({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, "r").margin == 2.0


# ---- losses against numpy -----------------------------------------------------------------------
def _logsigmoid(x): return -np.logaddexp(0.0, -x)


def test_reward_loss_is_bradley_terry():
  rng = np.random.default_rng(0)
  rc, rr, margin = rng.normal(size=6), rng.normal(size=6), rng.uniform(0, 1, size=6)
  for m, coef in ((0.0, 0.0), (margin, 0.0), (margin, 0.01)):
    want = -_logsigmoid(rc - rr - m).mean() + coef * ((rc + rr) ** 2).mean()
    got = reward_loss(Tensor(rc.astype(np.float32)), Tensor(rr.astype(np.float32)),
                      Tensor(np.float32(m) * np.ones(6, np.float32)) if np.ndim(m) else m, coef).item()
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_match_numpy(kind):
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (rng.normal(-20, 3, size=8) for _ in range(4))
  beta, smooth = 0.1, 0.2 if kind == "sigmoid" else 0.0
  h = (pc - pr) - (rc - rr)
  want = {"sigmoid": -_logsigmoid(beta * h) * (1 - smooth) - _logsigmoid(-beta * h) * smooth,
          "hinge": np.maximum(0.0, 1 - beta * h), "ipo": (h - 1 / (2 * beta)) ** 2}[kind]
  f = lambda a: Tensor(a.astype(np.float32))
  got = dpo_loss(f(pc), f(pr), f(rc), f(rr), beta, kind, smooth).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- reward model -------------------------------------------------------------------------------
def _tiny(seed=0) -> Transformer:
  args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=13, hidden_dim=24, max_position_embeddings=12)
  m = Transformer(args, max_seq_len=12)
  m.init_random(seed, std=0.3)
  return m


def test_reward_gradients_match_finite_differences():
  m = _tiny()
  score = new_score_head(m, seed=3, std=0.5)
  rng = np.random.default_rng(0)
  chosen, rejected = rng.integers(0, 13, size=(2, 10)), rng.integers(0, 13, size=(2, 10))
  last_c, last_r = np.array([9, 6]), np.array([4, 9])
  d = m.device

  def loss_of(tensors=None) -> Tensor:
    r = last_token_scores(m, score, Tensor(np.concatenate([chosen, rejected]), device=d),
                          Tensor(np.concatenate([last_c, last_r]), device=d))
    return reward_loss(r[:2], r[2:], 0.1, 0.05)

  params = {"score.weight": score.weight, **{k: v for k, v in m.state_dict().items()
                                              if k in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight")}}
  with Context(TRAINING=1):
    grads = dict(zip(params, [g.numpy() for g in loss_of().gradient(*params.values())]))
  eps = 1e-2
  for name, p in params.items():
    base = p.numpy().copy()
    for idx in [tuple(int(rng.integers(0, s)) for s in base.shape) for _ in range(2)]:
      def at(delta):
        w = base.copy()
        w[idx] += delta
        p.assign(Tensor(w, device=d)).realize()
        with Context(TRAINING=1): return float(loss_of().item())   # the graph the gradient came from
      fd = (at(eps) - at(-eps)) / (2 * eps)
      p.assign(Tensor(base, device=d)).realize()
      assert grads[name][idx] == pytest.approx(fd, rel=5e-2, abs=2e-4), (name, idx)


def _tiny_hf_model(out: Path, seed: int = 0) -> Path:
  """A small random Llama in Hugging Face layout with the bundled tokenizer (fast to compile, fast to train)."""
  tok = Tokenizer(TOKENIZER)
  args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=128,
                   max_position_embeddings=64, tie_embeddings=True)
  m = Transformer(args, max_seq_len=64)
  m.init_random(seed)
  hf.save(out, args, {k: v.numpy() for k, v in m.state_dict().items()}, tokenizer_model=TOKENIZER)
  return out


NAMES = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna", "Tim", "Mia"]
THINGS = ["a ball", "a cat", "a dog", "a tree", "a box", "a car", "a cake", "a hat"]
VERBS = ["saw", "liked", "found", "had", "wanted"]


def _story(rng: random.Random) -> str: return f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}."


def marker_pairs(path: Path, n: int, seed: int = 0) -> Path:
  """Pairs of two random one-line stories where the chosen one ends with the marker sentence 'It was happy.'"""
  rng = random.Random(seed)
  recs = [{"prompt": [{"role": "user", "content": f"Tell me about {rng.choice(NAMES)}."}],
           "chosen": [{"role": "assistant", "content": f"{_story(rng)} It was happy."}],
           "rejected": [{"role": "assistant", "content": f"{_story(rng)} It was {rng.choice(['red', 'big', 'sad'])}."}]}
          for _ in range(n)]
  return _write(path, recs)


HF_SCORES = """
import json, sys
import torch
from transformers import LlamaForSequenceClassification
model = LlamaForSequenceClassification.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad(): print(json.dumps([model(torch.tensor([ids])).logits[0, 0].item() for ids in json.loads(sys.stdin.read())]))
"""


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tinyllama2.cli", *args], input=stdin, capture_output=True, text=True,
                        timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_reward_model_learns_a_rule_and_loads_in_transformers(tmp_path, capsys):
  base = _tiny_hf_model(tmp_path / "base")
  data = marker_pairs(tmp_path / "pairs.json", 100)
  run = _cli("rm", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "rm"), "--lora-r", "8",
             "--target-modules", "q_proj,v_proj,down_proj", "--seq-len", "48", "--max-steps", "40", "--lr", "3e-3",
             "--eval-every", "40", "--save-every", "40")
  assert run.returncode == 0, run.stderr[-3000:]
  last = json.loads((tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["val_accuracy"] > 0.9, last
  cfg = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
  # scored on fresh stories: the rule was learnt, not the training pairs
  llm = Llama.from_pretrained(tmp_path / "rm" / "model")
  rng = random.Random(7)
  fresh = [(_story(rng), rng.choice(["sad", "big", "red"])) for _ in range(20)]
  good = llm.reward([[{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": f"{s} It was happy."}]
                     for s, _ in fresh])
  bad = llm.reward([[{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": f"{s} It was {w}."}]
                    for s, w in fresh])
  assert (good > bad).mean() > 0.9
  # Hugging Face's class reads the same scores from the same ids
  pytest.importorskip("transformers", reason="transformers (with PyTorch) is a test extra: pip install -e '.[dev]'")
  ids = [llm.tokenizer.encode(t, bos=True, eos=True) for t in ("Tom saw a cat. It was happy.", "Mia had a box.", "Ben")]
  ours = llm.reward(ids)
  theirs = subprocess.run([sys.executable, "-c", HF_SCORES, str(tmp_path / "rm" / "model")], input=json.dumps(ids),
                          capture_output=True, text=True, timeout=600)
  assert theirs.returncode == 0, theirs.stderr[-3000:]
  np.testing.assert_allclose(ours, json.loads(theirs.stdout), atol=1e-4)
  # and the command line scores as the library does
  from tinyllama2.cli import main
  assert main(["rm", "score", "--model", str(tmp_path / "rm" / "model"), "--text", "Tom saw a cat. It was happy.",
               "--text", "Mia had a box."]) == 0
  np.testing.assert_allclose([float(x) for x in capsys.readouterr().out.split()], ours[:2], atol=1e-5)


def test_reward_and_language_models_refuse_each_others_calls(tmp_path):
  lm = Llama.from_pretrained(BUNDLED)
  with pytest.raises(ValueError, match="not a reward model"): lm.reward(["hi"])
  # a reward model written by hand in Hugging Face's layout
  from tinyllama2 import reward
  reward.save(tmp_path / "rm", lm.model, new_score_head(lm.model), TOKENIZER)
  rm = Llama.from_pretrained(tmp_path / "rm")
  assert rm.model.quantization is None
  with pytest.raises(ValueError, match="reward model"): rm.generate("Once")
  assert rm.reward(["Once upon a time"]).shape == (1,)
  with pytest.raises(ValueError, match="a list of inputs"): rm.reward("Once upon a time")
  r = _cli("rm", "--model", str(tmp_path / "rm"), "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o"))
  assert r.returncode == 1 and "preference data not found" in r.stderr and "Traceback" not in r.stderr


# ---- DPO ----------------------------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x.astype(np.float64) - x.max())
  return e / e.sum()


def _metrics(out: Path) -> list[dict]: return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_starts_at_ln2_learns_the_preference_and_resumes_exactly(tmp_path, monkeypatch):
  from tinyllama2.train.recipes import DPOOptions, train_dpo
  base = _tiny_hf_model(tmp_path / "base")
  data = marker_pairs(tmp_path / "pairs.json", 60)

  def run(out: str, steps: int, resume: bool = False):
    o = DPOOptions(model=str(base), data=str(data), out=str(tmp_path / out), seq_len=48, val_fraction=0.2,
                   target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1, resume=resume, beta=0.1,
                   train=dict(max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=6, save_every=2))
    return train_dpo(o, progress=False)

  run("full", 12)
  rows = _metrics(tmp_path / "full")
  first, last = rows[0], rows[-1]
  # policy = reference at the first step: the loss is ln 2 and every reward is 0 (up to float32 rounding of the
  # two forward passes)
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"): assert abs(first[k]) < 1e-5, (k, first[k])
  assert last["rewards/accuracies"] > 0.9 and last["val_rewards/accuracies"] > 0.9, last
  assert last["rewards/margins"] > 0.1
  # the chosen style (the marker word) became more likely after "It was", on stories it was not trained on
  base_lm, tuned = Llama.from_pretrained(base), Llama.from_pretrained(base, adapter=tmp_path / "full" / "adapter")
  tok = base_lm.tokenizer
  with_word, without = tok.encode("Tom saw a cat. It was happy.", bos=False), tok.encode("Tom saw a cat. It was", bos=False)
  assert with_word[:len(without)] == without
  happy = with_word[len(without)]   # the marker's first token after "It was"
  rng = random.Random(3)
  gains = []
  for _ in range(6):
    ids = Llama2ChatTemplate().encode([{"role": "user", "content": "Tell me about Tom."}], tok)
    ids += tok.encode(f" {_story(rng)} It was", bos=False)
    logp = lambda lm: float(np.log(_softmax(lm.logits(ids)[-1])[happy]))
    gains.append(logp(tuned) - logp(base_lm))
  assert np.mean(gains) > 0.5, gains
  # killed right after its checkpoint at step 6, resumed: the same metrics as the uninterrupted run
  from tinyllama2.train.trainer import Trainer
  save = Trainer.save_checkpoint

  def save_then_die(self):
    path = save(self)
    if self.step == 6: raise KeyboardInterrupt
    return path

  monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
  with pytest.raises(KeyboardInterrupt): run("cut", 12)
  monkeypatch.undo()
  run("cut", 12, resume=True)
  cut = _metrics(tmp_path / "cut")
  drop = ("tokens_per_s",)
  assert [{k: v for k, v in r.items() if k not in drop} for r in cut] == \
         [{k: v for k, v in r.items() if k not in drop} for r in rows]
  assert (tmp_path / "full" / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_reference_file_of_other_rows_is_refused(tmp_path):
  from tinyllama2.train.recipes import _reference
  pairs = preference_pairs(marker_pairs(tmp_path / "p.json", 6), Tokenizer(TOKENIZER), 48)
  train, val = pairs.split(0.3)
  np.savez(tmp_path / "ref.npz", rows=np.zeros(32, np.uint8), train_chosen=np.zeros(len(train)),
           train_rejected=np.zeros(len(train)), val_chosen=np.zeros(len(val)), val_rejected=np.zeros(len(val)))
  with pytest.raises(ValueError, match="reference log-probs of other data"):
    _reference(None, train, val, tmp_path / "ref.npz", 4, progress=False)


def test_dpo_rejects_bad_settings_before_loading(tmp_path):
  r = _cli("dpo", "--model", str(BUNDLED), "--data", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"),
           "--loss", "sigmoid", "--label-smoothing", "0.7")
  assert r.returncode == 2 and "--label-smoothing" in r.stderr
  marker_pairs(tmp_path / "p.json", 4)
  r = _cli("dpo", "--model", str(BUNDLED), "--data", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"),
           "--loss", "ipo", "--label-smoothing", "0.1")
  assert r.returncode == 1 and "--label-smoothing is for --loss sigmoid" in r.stderr
