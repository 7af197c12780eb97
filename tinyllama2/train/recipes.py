"""End-to-end recipes behind `tinyllama2 pretrain|finetune` and the examples: data → model → Trainer → export.

Output folders: `OUT/model` (pretraining or full fine-tuning: a Hugging Face directory with tokenizer.model) or
`OUT/adapter` (LoRA: a PEFT adapter directory), rewritten at every checkpoint; `OUT/checkpoints` for --resume;
`OUT/metrics.jsonl` and, with matplotlib, `OUT/loss.png`.
"""
from __future__ import annotations

import fnmatch
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import hf
from ..config import PRESETS, ModelArgs
from ..model import Transformer
from ..parallel import replicate_model
from ..tokenizer import Llama2ChatTemplate, PlainTemplate, Tokenizer
from ..fileio import check_writable, user_entries
from .data import BatchOrder, json_layout, load_records, record_messages, sft_blocks, text_blocks
from .trainer import TrainConfig, Trainer, check_training_memory, latest_checkpoint, read_metrics


def replace_dir(out: Path, write: Callable[[Path], None]) -> None:
  """write(tmp) a folder beside `out`, then put it in out's place. The previous folder is moved aside (as one of our
  temp folders, cleaned by later runs), not deleted, until the new one is in place: a kill in between leaves it
  beside the output instead of losing it."""
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  if not out.exists():
    tmp.rename(out)
    return
  old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
  old.rmdir()
  out.rename(old)
  tmp.rename(out)
  shutil.rmtree(old, ignore_errors=True)


def export_hf(model: Transformer, out: Path, tokenizer: Tokenizer | None) -> None:
  """Write the model's (non-LoRA) weights as a Hugging Face directory, replacing what was there only at the end."""
  weights = {k: v.float().numpy() for k, v in model.state_dict().items() if "lora_" not in k}
  replace_dir(out, lambda d: hf.save(d, model.args, weights, tokenizer_model=tokenizer.path if tokenizer else None))


def _check_out(out: Path, resume: bool) -> None:
  """Before any work: --out is a folder we may write, holding a checkpoint to resume from with --resume (as HF's
  Trainer, which raises "no valid checkpoint found") and nothing of the user's without it."""
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"--out {out} is a file, but training writes a folder; choose another --out")
  if resume:
    if latest_checkpoint(out / "checkpoints") is None:
      raise FileNotFoundError(f"--resume: no valid checkpoint found in {out / 'checkpoints'}; drop --resume to start "
                              "a new run (in a new or empty --out)")
  elif out.is_dir() and user_entries(out):
    raise FileExistsError(f"{out} already exists and is not empty: pass --resume to continue that run, or choose another --out")
  check_writable(out, "--out")


def _placement(o, cfg: TrainConfig) -> tuple[str, tuple[str, ...] | None]:
  """(the device the model is loaded on, the devices of data-parallel training or None)."""
  from ..devices import resolve_device
  from ..parallel import parse_devices
  if not o.devices: return resolve_device(o.device), None
  if o.device: raise ValueError("pass --device or --devices, not both")
  devices = parse_devices(o.devices)
  if cfg.batch_size % len(devices):
    raise ValueError(f"--batch-size {cfg.batch_size} cannot be split evenly over {len(devices)} devices: use a "
                     f"multiple of {len(devices)}")
  return devices[0], devices


# ---- pretraining --------------------------------------------------------------------------------
@dataclass
class PretrainOptions:
  data: list[str]
  out: str
  preset: str | None = None                  # a PRESETS name; else the size fields below
  dim: int = 128
  n_layers: int = 6
  n_heads: int = 4
  n_kv_heads: int | None = 2
  hidden_dim: int | None = None
  vocab_size: int = 512                      # for a newly trained tokenizer
  tokenizer: str | None = None               # an existing tokenizer.model instead of training one
  seq_len: int = 256
  val_fraction: float = 0.02
  device: str | None = None
  devices: str | list[str] | None = None     # data-parallel training over these (each batch split between them)
  resume: bool = False
  train: dict = field(default_factory=dict)  # TrainConfig fields


def pretrain_model_args(o: PretrainOptions, vocab_size: int) -> ModelArgs:
  if o.preset:
    if o.preset not in PRESETS: raise ValueError(f"unknown --config {o.preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[o.preset].replace(vocab_size=vocab_size, max_position_embeddings=o.seq_len)
  return ModelArgs(dim=o.dim, n_layers=o.n_layers, n_heads=o.n_heads, n_kv_heads=o.n_kv_heads, vocab_size=vocab_size,
                   hidden_dim=o.hidden_dim, multiple_of=32, max_position_embeddings=o.seq_len, tie_embeddings=True)


def pretrain(o: PretrainOptions, progress: bool = True) -> Trainer:
  """Train a tokenizer on the corpus (unless one is given), then a Llama from scratch; export to OUT/model."""
  from ..vocab import train_vocab
  out = Path(o.out)
  _check_out(out, o.resume)
  for p in map(Path, o.data):
    if not p.is_file(): raise FileNotFoundError(f"training data not found: {p}")
  cfg = TrainConfig(out_dir=str(out), **o.train)
  cfg.validate()
  device, devices = _placement(o, cfg)
  check_training_memory(pretrain_model_args(o, o.vocab_size), cfg.batch_size, o.seq_len, device)
  tok_path = Path(o.tokenizer) if o.tokenizer else out / "tokenizer.model"
  if not tok_path.is_file():
    if o.tokenizer: raise FileNotFoundError(f"tokenizer not found: {tok_path}")
    train_vocab(o.data, o.vocab_size, out / "tokenizer", verbose=False)
  tok = Tokenizer(tok_path)
  args = pretrain_model_args(o, tok.vocab_size)
  train, val = text_blocks(o.data, tok, o.seq_len).split(o.val_fraction)
  model = Transformer(args, max_seq_len=o.seq_len, device=device)
  model.init_random(seed=cfg.seed)
  if devices: replicate_model(model, devices)
  trainer = Trainer(model, model.state_dict(), train, val, cfg, on_save=lambda _: export_hf(model, out / "model", tok))
  if o.resume and trainer.resume() and progress: print(f"resumed at step {trainer.step}")
  if progress: print(f"model: {args.n_params() / 1e6:.2f}M parameters; {len(train)} training blocks of {o.seq_len} "
                     f"tokens, {len(val)} held out")
  trainer.fit(progress=progress)
  return trainer


# ---- fine-tuning --------------------------------------------------------------------------------
@dataclass
class FinetuneOptions:
  model: str
  data: str
  out: str
  format: str = "auto"                        # alpaca | sharegpt | text | auto (by file content)
  tokenizer: str | None = None
  template: str = "llama2"                    # llama2 | plain
  lora: bool = True
  lora_r: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
  freeze: list[str] = field(default_factory=list)   # full fine-tuning: glob patterns of frozen weights
  freeze_layers: int = 0                              # full fine-tuning: freeze the embeddings and first N blocks
  seq_len: int = 256
  val_fraction: float = 0.05
  limit: int | None = None                    # use only the first N records
  device: str | None = None
  devices: str | list[str] | None = None      # data-parallel training over these (each batch split between them)
  resume: bool = False
  train: dict = field(default_factory=dict)


def detect_format(path: Path) -> tuple[str, str]:
  """--format auto, by content: a file starting with '[' is a JSON list of records, one starting with '{' JSONL;
  their records are ShareGPT when the first has 'conversations', else Alpaca. Any other file is plain text, except
  a .json/.jsonl file, which must be JSON. A JSON file that does not parse is an error, never read as text.
  Returns (format, what was found, for the report)."""
  from .data import _read_text
  layout = "text" if path.suffix in (".txt", ".md") else json_layout(_read_text(path))
  if layout == "text":
    if path.suffix in (".json", ".jsonl"):
      raise ValueError(f"{path}: not JSON (it does not start with '[' or '{{'); pass --format text to train on it as text")
    return "text", "plain text"
  records, layout = load_records(path)
  first = records[0] if records else {}
  fmt = "sharegpt" if isinstance(first, dict) and "conversations" in first else "alpaca"
  how = "a JSON list" if layout == "array" else "JSONL"
  return fmt, f"{how} of {len(records)} {'ShareGPT' if fmt == 'sharegpt' else 'Alpaca'} records"


def frozen_names(names: list[str], patterns: list[str], first_layers: int) -> set[str]:
  """Weights that a partial fine-tune keeps fixed: glob patterns, and the embeddings + first N blocks."""
  out = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
  if first_layers:
    out |= {n for n in names if n.startswith("tok_embeddings.") or
            (n.startswith("layers.") and int(n.split(".")[1]) < first_layers)}
  return out


def _finetune_checks(o: FinetuneOptions, progress: bool):
  """Everything that can fail before the model loads: output folder, device, data format, settings, memory.
  Returns (device, data-parallel devices or None, format, TrainConfig, LoraConfig or None)."""
  from .. import lora
  from ..checkpoint import load_checkpoint
  _check_out(Path(o.out), o.resume)
  if o.format not in ("auto", "alpaca", "sharegpt", "text"):
    raise ValueError(f"unknown --format {o.format!r} (auto, alpaca, sharegpt or text)")
  data = Path(o.data)
  if not data.is_file(): raise FileNotFoundError(f"training data not found: {data}")
  fmt, found = detect_format(data) if o.format == "auto" else (o.format, "")
  if progress and found: print(f"data: {data} is {found} (--format auto; pass --format to choose)")
  cfg = TrainConfig(out_dir=str(o.out), **o.train)
  cfg.validate()
  device, devices = _placement(o, cfg)
  lcfg = lora.LoraConfig(r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout, target_modules=o.target_modules) \
    if o.lora else None
  check_training_memory(load_checkpoint(o.model).args, cfg.batch_size, o.seq_len, device)
  return device, devices, fmt, cfg, lcfg


def finetune(o: FinetuneOptions, progress: bool = True) -> Trainer:
  """LoRA (→ OUT/adapter) or full/partial (→ OUT/model) supervised fine-tuning of a pretrained model."""
  from .. import lora
  from ..llama import Llama
  out = Path(o.out)
  device, devices, fmt, cfg, lcfg = _finetune_checks(o, progress)
  llm = Llama.from_pretrained(o.model, tokenizer=o.tokenizer, device=device, dtype="float32", max_seq_len=o.seq_len)
  tok, model = llm.tokenizer, llm.model
  if fmt == "text": blocks = text_blocks([o.data], tok, o.seq_len)
  else: blocks = sft_blocks(o.data, tok, o.seq_len, Llama2ChatTemplate() if o.template == "llama2" else PlainTemplate(), o.limit)
  train, val = blocks.split(o.val_fraction)
  params = _trainable(model, o, lcfg, cfg.seed)
  if devices: replicate_model(model, devices)
  if o.lora:
    def on_save(_): lora.save_adapter(model, out / "adapter", lcfg, base_model=str(o.model))
  else:
    def on_save(_): export_hf(model, out / "model", tok)
  trainer = Trainer(model, params, train, val, cfg, on_save=on_save)
  return _fit(trainer, o, params, progress, f"; {len(train)} training rows, {len(val)} held out")


# ---- alignment: reward model, DPO ---------------------------------------------------------------
@dataclass
class RewardOptions(FinetuneOptions):
  lora_dropout: float = 0.0                 # trl disables dropout for preference training
  center_rewards_coefficient: float = 0.0   # trl's: pulls the mean reward towards 0


@dataclass
class DPOOptions(FinetuneOptions):
  lora_dropout: float = 0.0                 # as trl: the policy's log-probs are then comparable to the reference's
  beta: float = 0.1
  loss_type: str = "sigmoid"                # sigmoid | ipo | hinge
  label_smoothing: float = 0.0


def _preference_setup(o: FinetuneOptions, max_seq_len: int, progress: bool):
  """Checks (output folder, device, data, settings, memory), then the model and the preference pairs split into
  (train, held-out). Returns (llm, cfg, lora config or None, train pairs, held-out pairs, data-parallel devices or
  None: the model is spread over them once its trainable tensors exist)."""
  from .. import lora
  from ..checkpoint import load_checkpoint
  from ..llama import Llama
  from .data import preference_pairs
  _check_out(Path(o.out), o.resume)
  if not Path(o.data).is_file(): raise FileNotFoundError(f"preference data not found: {o.data}")
  cfg = TrainConfig(out_dir=str(o.out), **o.train)
  cfg.validate()
  device, devices = _placement(o, cfg)
  lcfg = lora.LoraConfig(r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout, target_modules=o.target_modules) \
    if o.lora else None
  check_training_memory(load_checkpoint(o.model).args, 2 * cfg.batch_size, o.seq_len + 1, device)
  llm = Llama.from_pretrained(o.model, tokenizer=o.tokenizer, device=device, dtype="float32", max_seq_len=max_seq_len)
  if llm.score is not None: raise ValueError(f"{o.model} is a reward model; start from a language model (an SFT model)")
  template = Llama2ChatTemplate() if o.template == "llama2" else PlainTemplate()
  train, val = preference_pairs(o.data, llm.tokenizer, o.seq_len, template, o.limit).split(o.val_fraction)
  if progress: print(f"data: {len(train)} preference pairs for training, {len(val)} held out")
  return llm, cfg, lcfg, train, val, devices


def _trainable(model: Transformer, o: FinetuneOptions, lcfg, seed: int) -> dict:
  """The LoRA tensors (injected now), or the weights a full / partial fine-tune trains."""
  from .. import lora
  if lcfg is not None: return lora.inject(model, lcfg, seed=seed)
  all_params = model.state_dict()
  frozen = frozen_names(list(all_params), o.freeze, o.freeze_layers)
  for n in frozen: all_params[n].is_param_(False)
  return {n: t for n, t in all_params.items() if n not in frozen}


def train_reward_model(o: RewardOptions, progress: bool = True) -> Trainer:
  """A reward model (trunk + score head) on preference pairs → OUT/model, a LlamaForSequenceClassification
  directory (LoRA is folded into it at every checkpoint)."""
  from .. import reward
  from .align import RewardModeling, RewardRows
  out = Path(o.out)
  llm, cfg, lcfg, train, val, devices = _preference_setup(o, o.seq_len + 1, progress)
  model, tok = llm.model, llm.tokenizer
  params = _trainable(model, o, lcfg, cfg.seed)
  params.pop("output.weight", None)   # the LM head plays no part in a reward
  score = reward.new_score_head(model, seed=cfg.seed)
  if devices:
    replicate_model(model, devices)
    score.weight.replace(score.weight.shard(devices).realize())
  params[reward.SCORE] = score.weight
  objective = RewardModeling(model, score, o.center_rewards_coefficient)
  trainer = Trainer(model, params, RewardRows(train), RewardRows(val), cfg, objective=objective,
                    on_save=lambda _: replace_dir(out / "model", lambda d: reward.save(d, model, score, tok.path)))
  return _fit(trainer, o, params, progress)


def train_dpo(o: DPOOptions, progress: bool = True) -> Trainer:
  """DPO of a language model on preference pairs against the model as loaded (the reference: its log-probs are
  computed once, before training, and kept in OUT/reference_logps.npz) → OUT/adapter (LoRA) or OUT/model."""
  from .. import lora
  from .align import DirectPreference, DPOConfig, DPORows
  out = Path(o.out)
  dcfg = DPOConfig(o.beta, o.loss_type, o.label_smoothing)
  dcfg.validate()
  llm, cfg, lcfg, train, val, devices = _preference_setup(o, o.seq_len, progress)
  model, tok = llm.model, llm.tokenizer
  ref = _reference(model, train, val, out / "reference_logps.npz", cfg.batch_size, progress)
  params = _trainable(model, o, lcfg, cfg.seed)
  if devices: replicate_model(model, devices)
  if lcfg is not None:
    def on_save(_): lora.save_adapter(model, out / "adapter", lcfg, base_model=str(o.model))
  else:
    def on_save(_): export_hf(model, out / "model", tok)
  trainer = Trainer(model, params, DPORows(train, *ref[:2]), DPORows(val, *ref[2:]), cfg, on_save=on_save,
                    objective=DirectPreference(model, dcfg))
  return _fit(trainer, o, params, progress)


def _reference(model: Transformer, train, val, path: Path, batch_size: int, progress: bool) -> list[np.ndarray]:
  """DPO's reference log-probs [train chosen, train rejected, val chosen, val rejected]: from the file a previous
  run of this --out wrote for the same rows (a fingerprint of the tokens and weights says so), else computed with
  the model before any training, so a resumed run uses the same."""
  import hashlib
  from ..fileio import atomic_write
  from .align import reference_logprobs
  keys = ("train_chosen", "train_rejected", "val_chosen", "val_rejected")
  digest = hashlib.sha256()
  for pairs in (train, val):
    for a in (pairs.chosen.tokens, pairs.chosen.weights, pairs.rejected.tokens, pairs.rejected.weights): digest.update(a.tobytes())
  fingerprint = np.frombuffer(digest.digest(), dtype=np.uint8)
  if path.is_file():
    with np.load(path) as f:
      if "rows" in f and np.array_equal(f["rows"], fingerprint): return [f[k] for k in keys]
    raise ValueError(f"{path} holds reference log-probs of other data (or --seq-len, --template, --limit); "
                     "use the settings of the run being resumed")
  if progress: print(f"reference log-probs of {len(train) + len(val)} pairs ...")
  ref = [*reference_logprobs(model, train, batch_size), *reference_logprobs(model, val, batch_size)]
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path) as f: np.savez(f, rows=fingerprint, **dict(zip(keys, ref)))
  return ref


def _fit(trainer: Trainer, o: FinetuneOptions, params: dict, progress: bool, detail: str = "") -> Trainer:
  """Resume if asked, say what is trained, train."""
  if o.resume and trainer.resume() and progress: print(f"resumed at step {trainer.step}")
  if progress:
    n = sum(int(np.prod(t.shape)) for t in params.values())
    print(f"training {n:,} parameters ({'LoRA' if o.lora else 'full'}){detail}")
  trainer.fit(progress=progress)
  return trainer


# ---- alignment: PPO, GRPO -----------------------------------------------------------------------
@dataclass
class RLOptions:
  """What PPO and GRPO share: the policy (a LoRA adapter on `model`), prompts, rewards, sampling and updates."""
  model: str
  prompts: str                                  # JSON / JSONL: strings or {"prompt": text | messages}
  out: str
  reward_model: str | None = None               # a reward model directory (tinyllama2 rm) ...
  reward_fns: list = field(default_factory=list)  # ... and/or Python callables (prompts, completions) -> rewards
  tokenizer: str | None = None
  template: str = "llama2"                      # how message prompts are rendered
  lora_r: int = 8
  lora_alpha: float = 16.0
  target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
  iterations: int = 20                          # rollout + update rounds
  prompts_per_iteration: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  epochs: int = 4                               # passes over each iteration's rollouts (PPO's ppo_epochs)
  limit: int | None = None
  device: str | None = None
  train: dict = field(default_factory=dict)     # TrainConfig fields; batch_size is the minibatch


@dataclass
class PPOOptions(RLOptions):
  ppo: dict = field(default_factory=dict)       # PPOConfig fields


@dataclass
class GRPOOptions(RLOptions):
  epochs: int = 1                               # trl's num_iterations
  grpo: dict = field(default_factory=dict)      # GRPOConfig fields


def load_prompts(path: str | Path, tokenizer: Tokenizer, template, limit: int | None) -> list[tuple[str, list[int]]]:
  """(text shown to reward functions, prompt ids) per record: a string is text the completion continues (BOS
  text); {"prompt": messages} is rendered with the chat template (its text: the last message)."""
  path = Path(path)
  records = load_records(path)[0][:limit]
  if not records: raise ValueError(f"{path}: holds no prompts")
  out = []
  for i, rec in enumerate(records):
    p = rec.get("prompt") if isinstance(rec, dict) else rec
    if isinstance(p, str): out.append((p, tokenizer.encode(p, bos=True)))
    elif isinstance(p, list) and p:
      msgs = record_messages({"conversations": p}, f"{path} record {i}")
      try: out.append((msgs[-1]["content"], template.encode(msgs, tokenizer)))
      except ValueError as e: raise ValueError(f"{path} record {i}: {e}") from None
    else: raise ValueError(f"{path} record {i}: expected a string or {{\"prompt\": text or messages}}, got {rec!r}"[:300])
  return out


def _rl_setup(o: RLOptions, rows_per_iteration: int):
  """Checks, then (policy llm with LoRA injected, its trainable tensors, lora config, reward model or None,
  prompts, row width, TrainConfig)."""
  from .. import lora
  from ..devices import resolve_device
  from ..llama import Llama
  _check_out(Path(o.out), resume=False)
  device = resolve_device(o.device)
  if not Path(o.prompts).is_file(): raise FileNotFoundError(f"prompts not found: {o.prompts}")
  if o.reward_model is None and not o.reward_fns:
    raise ValueError("no reward: pass --reward-model DIR (a reward model from `tinyllama2 rm`) or reward functions")
  for name in ("iterations", "prompts_per_iteration", "max_new_tokens", "epochs"):
    if getattr(o, name) < 1: raise ValueError(f"{name} must be at least 1, got {getattr(o, name)}")
  mb = o.train.get("batch_size", 8)
  if o.train.get("grad_accum", 1) != 1: raise ValueError("PPO/GRPO update on whole minibatches: leave grad_accum at 1")
  if rows_per_iteration % mb: raise ValueError(f"the {rows_per_iteration} completions of an iteration must split into "
                                               f"minibatches of --batch-size {mb}")
  steps = o.iterations * o.epochs * (rows_per_iteration // mb)
  cfg = TrainConfig(out_dir=o.out, **({"warmup_steps": 0, "eval_every": steps + 1, "save_every": steps + 1} | o.train
                                      | {"max_steps": steps}))
  cfg.validate()
  rm = Llama.from_pretrained(o.reward_model, device=device) if o.reward_model else None
  if rm is not None and rm.score is None: raise ValueError(f"--reward-model {o.reward_model} is not a reward model")
  llm = Llama.from_pretrained(o.model, tokenizer=o.tokenizer, device=device, dtype="float32")
  if rm is not None and rm.args.vocab_size != llm.args.vocab_size:
    raise ValueError(f"--reward-model has a vocabulary of {rm.args.vocab_size}, the policy {llm.args.vocab_size}: the "
                     "reward model must read the policy's token ids (train it from the same model family)")
  template = Llama2ChatTemplate() if o.template == "llama2" else PlainTemplate()
  prompts = load_prompts(o.prompts, llm.tokenizer, template, o.limit)
  if o.prompts_per_iteration > len(prompts):
    raise ValueError(f"--prompts-per-iteration {o.prompts_per_iteration} is more than the {len(prompts)} prompts given")
  width = max(len(ids) for _, ids in prompts) + o.max_new_tokens + 1
  if width > llm.model.max_seq_len:
    raise ValueError(f"the longest prompt plus --max-new-tokens is {width} tokens, more than the model's context "
                     f"{llm.model.max_seq_len}")
  # no dropout: the policy must give the log-probs it sampled with (trl disables it too)
  lcfg = lora.LoraConfig(r=o.lora_r, alpha=o.lora_alpha, dropout=0.0, target_modules=o.target_modules)
  params = lora.inject(llm.model, lcfg, seed=cfg.seed)
  return llm, params, lcfg, rm, prompts, width, cfg


def _rewards(o: RLOptions, rm, texts: list[str], completions: list[str], rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The sum of the reward model's score of each row (prompt + completion) and every reward function's value."""
  total = np.zeros(len(texts), dtype=np.float32)
  if rm is not None: total += rm.reward([r[:n].tolist() for r, n in zip(rows, lengths)])
  for fn in o.reward_fns:
    name = getattr(fn, "__name__", repr(fn))
    try: values = np.asarray(list(fn(texts, completions)), dtype=np.float32)
    except Exception as e: raise ValueError(f"reward function {name} failed: {type(e).__name__}: {e}") from None
    if values.shape != (len(texts),):
      raise ValueError(f"reward function {name} returned shape {values.shape} for {len(texts)} completions; "
                       "it must return one number per completion")
    if not np.isfinite(values).all(): raise ValueError(f"reward function {name} returned a NaN or infinite reward")
    total += values
  return total


class RLRun:
  """The rollout-and-update loop PPO and GRPO share; `prepare` (per algorithm) turns scored rollouts into rows."""

  def __init__(self, o: RLOptions, group: int):
    from ..generate import GenerationConfig
    self.o, self.group = o, group
    self.llm, self.params, self.lcfg, self.rm, self.prompts, self.width, self.cfg = _rl_setup(o, o.prompts_per_iteration * group)
    self.model, self.tok = self.llm.model, self.llm.tokenizer
    # one end-of-sequence id: the one pack() appends to a completion that stopped
    self.gen = GenerationConfig(max_new_tokens=o.max_new_tokens, do_sample=True, temperature=o.temperature,
                                top_k=o.top_k, top_p=o.top_p, eos_token_id=self.tok.eos_id)
    self.order = BatchOrder(len(self.prompts), o.prompts_per_iteration, self.cfg.seed)
    self.trainer: Trainer | None = None
    self.steps: list[dict] = []   # every update's record (the metrics file has one line per iteration)

  def rollout(self, iteration: int):
    """Sample `group` completions of this iteration's prompts; (texts, completions, rows, mask, scores)."""
    from .rl import pack
    picked = [self.prompts[i] for i in self.order.next() for _ in range(self.group)]
    seeds = np.random.SeedSequence([self.cfg.seed, iteration]).spawn(len(picked))
    self.llm.decoder.forget()   # the weights changed since the last rollout: no cached prompt keys are valid
    gens = self.llm.rollouts([ids for _, ids in picked], self.gen, [np.random.default_rng(s) for s in seeds])
    tokens, mask = pack(gens, self.tok.eos_id, self.width, self.tok.eos_id)
    texts, completions = [t for t, _ in picked], [g.text for g in gens]
    lengths = np.array([len(g.prompt_tokens) for g in gens]) + mask.sum(1).astype(np.int64)
    return texts, completions, tokens, mask, _rewards(self.o, self.rm, texts, completions, tokens, lengths)

  def stats(self, tokens: np.ndarray, value_head=None):
    """(policy log-probs, values or None, reference log-probs) of the rows, without gradients."""
    from .. import lora
    from .rl import rollout_stats
    t = self.o.temperature
    logp, values = rollout_stats(self.model, tokens, self.cfg.batch_size, value_head, t)
    with lora.adapters_off(self.model): ref, _ = rollout_stats(self.model, tokens, self.cfg.batch_size, temperature=t)
    return logp, values, ref

  def update(self, rows, objective, iteration: int) -> dict:
    """Epochs of minibatch updates on the rows; the means of their metrics."""
    if self.trainer is None:
      self.trainer = Trainer(self.model, self.params, rows, None, self.cfg, objective=objective)
    self.trainer.set_data(rows, seed=self.cfg.seed * 1_000_003 + iteration)
    recs = [self.trainer.train_step() for _ in range(self.o.epochs * (len(rows) // self.cfg.batch_size))]
    self.steps += recs
    keys = [k for k in recs[0] if k not in ("step", "lr")]
    return {k: float(np.mean([r[k] for r in recs])) for k in keys} | {"step": recs[-1]["step"], "lr": recs[-1]["lr"]}

  def finish(self, progress: bool) -> None:
    from .. import lora
    lora.save_adapter(self.model, Path(self.o.out) / "adapter", self.lcfg, base_model=str(self.o.model))
    if self.trainer is not None: self.trainer.plot()
    if progress: print(f"adapter written to {Path(self.o.out) / 'adapter'}")


def _rl_loop(run: RLRun, prepare: Callable, objective, progress: bool, name: str) -> RLRun:
  import time
  from tqdm import tqdm
  for it in tqdm(range(run.o.iterations), desc=name, unit="iter", disable=not progress):
    t0 = time.perf_counter()
    texts, completions, tokens, mask, scores = run.rollout(it)
    t1 = time.perf_counter()
    rows, rec = prepare(tokens, mask, scores)
    rec = {"iteration": it + 1, **rec, **run.update(rows, objective, it), "completion_tokens": float(mask.sum(1).mean()),
           "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1}
    run.trainer.log(rec)
    if progress: tqdm.write(f"iteration {it + 1}: score {rec['objective/scores']:.3f}, kl {rec['objective/kl']:.3f}")
  run.finish(progress)
  if progress: print(rl_summary(read_metrics(Path(run.o.out) / "metrics.jsonl")))
  return run


def rl_summary(rows: list[dict]) -> str:
  """How the mean score moved (first third of the iterations → last third), the KL, and the time per iteration."""
  third = max(1, len(rows) // 3)
  mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
  later = rows[1:] or rows   # the first iteration compiles
  return (f"objective/scores {mean(rows[:third], 'objective/scores'):.3f} (first {third} iterations) -> "
          f"{mean(rows[-third:], 'objective/scores'):.3f} (last {third}); objective/kl {rows[0]['objective/kl']:.2f} -> "
          f"{rows[-1]['objective/kl']:.2f}; per iteration {mean(later, 'rollout_s'):.2f} s sampling + "
          f"{mean(later, 'update_s'):.2f} s updating")


def train_ppo(o: PPOOptions, progress: bool = True) -> RLRun:
  """PPO with a KL penalty to the reference (the model with its adapter off), a value head on the policy's trunk
  and GAE, as trl's PPOTrainer → OUT/adapter (PEFT format), OUT/metrics.jsonl (one line per iteration)."""
  from .. import reward
  from .rl import AdaptiveKL, PPOConfig, PPOObjective, RLRows, gae, kl_per_sequence, ppo_rewards, whiten
  pcfg = PPOConfig(**o.ppo)
  run = RLRun(o, group=1)
  value_head = reward.new_score_head(run.model, seed=run.cfg.seed + 1)
  run.params["v_head.weight"] = value_head.weight
  kl_ctl = AdaptiveKL(pcfg.kl_coef, pcfg.kl_target, pcfg.kl_horizon)

  def prepare(tokens, mask, scores):
    logp, values, ref = run.stats(tokens, value_head)
    rewards, kl = ppo_rewards(scores, logp, ref, mask, kl_ctl.value)
    adv, returns = gae(rewards, values * mask, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages: adv = whiten(adv, mask)
    kl_seq = kl_per_sequence(logp, ref, mask)
    rec = {"objective/scores": float(scores.mean()), "objective/kl": kl_seq, "objective/kl_coef": kl_ctl.value,
           "objective/rlhf_reward": float(scores.mean() - kl_ctl.value * kl.sum(1).mean())}
    kl_ctl.update(kl_seq, len(scores))
    return RLRows(tokens, mask, logp, adv, returns, values * mask), rec

  return _rl_loop(run, prepare, PPOObjective(run.model, value_head, pcfg, o.temperature), progress, "ppo")


def train_grpo(o: GRPOOptions, progress: bool = True) -> RLRun:
  """GRPO: groups of completions per prompt, advantages relative to the group, the clipped objective and an
  optional KL penalty (beta) to the reference, as trl's GRPOTrainer → OUT/adapter, OUT/metrics.jsonl."""
  from .rl import GRPOConfig, GRPOObjective, RLRows, group_advantages, kl_per_sequence
  gcfg = GRPOConfig(**o.grpo)
  if gcfg.num_generations < 2: raise ValueError("--num-generations must be at least 2 (advantages are relative to the group)")
  run = RLRun(o, group=gcfg.num_generations)
  objective = GRPOObjective(run.model, gcfg, o.temperature)

  def prepare(tokens, mask, scores):
    logp, _, ref = run.stats(tokens)
    adv = group_advantages(scores, gcfg.num_generations, gcfg.scale_rewards)
    groups = scores.reshape(-1, gcfg.num_generations)
    rec = {"objective/scores": float(scores.mean()), "objective/kl": kl_per_sequence(logp, ref, mask),
           "reward_std": float(groups.std(1, ddof=1).mean())}
    return RLRows(tokens, mask, logp, ref, adv), rec

  return _rl_loop(run, prepare, objective, progress, "grpo")
