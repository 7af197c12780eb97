"""stories260K against llama2.c's run.c: logits, greedy tokens, prompt tokens."""
import numpy as np
import pytest

from conftest import STORIES, STORIES_V1, TOK512, need


def greedy_runs(reference):
  return [r for r in reference["runc_generated"]["runs"] if float(r["temperature"]) == 0.0]


def test_logits_match_runc(stories, reference, ref_logits):
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:200]
  logits = stories.logits(tokens)
  assert logits.shape == (200, 512) and logits.dtype == np.float32
  assert np.abs(logits - ref_logits).max() < 1e-4


def test_prompt_tokens_match_runc(stories, reference):
  for run in greedy_runs(reference):
    if run["prompt"] is not None:
      assert stories.tokenizer.encode(run["prompt"], bos=True) == run["prompt_tokens"]


@pytest.mark.parametrize("index", range(6))
def test_greedy_generation_matches_runc(stories, reference, index):
  runs = greedy_runs(reference)
  if index >= len(runs): pytest.skip("fewer greedy reference runs")
  run = runs[index]
  prompt = run["prompt_tokens"] if run["prompt"] is None else run["prompt"]
  expected = run["tokens"][len(run["prompt_tokens"]):]
  # run.c generates until `steps` positions are filled and stops only on BOS
  g = stories.generate(prompt, max_new_tokens=len(expected), eos_token_id=1)
  assert g.prompt_tokens == run["prompt_tokens"]
  assert g.tokens == expected
  assert g.finish_reason == "length"


def test_v1_format_loads_same_weights(stories, reference):
  need(STORIES_V1)
  from tinyllama2 import Llama
  from tinyllama2.checkpoint import load_checkpoint
  legacy, v1 = load_checkpoint(STORIES), load_checkpoint(STORIES_V1)
  assert legacy.args == v1.args and set(legacy.weights) == set(v1.weights)
  for name, w in legacy.weights.items(): np.testing.assert_array_equal(w, v1.weights[name], err_msg=name)
  model = Llama.from_pretrained(STORIES_V1, tokenizer=TOK512)
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:32]
  np.testing.assert_allclose(model.logits(tokens), stories.logits(tokens), atol=1e-4)


def test_upstream_expected_text(stories, reference):
  expected = reference["upstream_expected"][0]["text"]
  g = stories.generate([1], max_new_tokens=199, eos_token_id=1)
  assert expected.startswith(g.text[:300]) and len(g.text) > 300
