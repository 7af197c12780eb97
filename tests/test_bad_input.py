"""Bad input, table-driven: every case must fail with exit code != 0 (CLI) or the named exception (API), one line
naming the problem, no traceback, and the files of a user's folder byte-identical afterwards (nothing replaced,
nothing added). Most cases fail at validation, so the CLI runs in this process; a few subprocesses prove that
nothing reaches a real user's stderr as a traceback."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA_TOK, SHARED, STORIES, TOK512, need
from tinyllama2 import DEFAULT_MODEL, Llama
from tinyllama2.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
ALPACA = SHARED / "instruct" / "alpaca_en_demo.json"
D = str(DEFAULT_MODEL)
RECORD = {"instruction": "Name a color.", "input": "", "output": "Blue."}


# ---- the user's folder ------------------------------------------------------------------------------
def _write(root: Path, rel: str, data: str | bytes) -> None:
  p = root / rel
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data if isinstance(data, bytes) else data.encode())


def _small_tokenizer() -> bytes:
  """tok512 cut to its first 300 pieces: fewer pieces than stories260K's 512 rows."""
  from tinyllama2.spm_proto import parse_model, serialize_model
  pieces, rest = parse_model(TOK512.read_bytes())
  return serialize_model(pieces[:300], rest)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
  need(STORIES, TOK512, LLAMA_TOK, ALPACA)
  root = tmp_path_factory.mktemp("user")
  files = {
    "notes.txt": "my notes\n", "existing.gguf": b"GGUF mine", "existing.model": b"my tokenizer",
    "existing.vocab": "my vocab\n", "run/notes.txt": "keep me\n", "run/adapter/adapter_config.json": '{"mine": 1}',
    "full/config.json": '{"mine": 1}', "noconfig_adapter/readme.txt": "an adapter folder without its config\n",
    "data/records.jsonl": "\n".join([json.dumps(RECORD)] * 3 + ['{"instruction": "x", "output": '] + [json.dumps(RECORD)]),
    "data/truncated.json": json.dumps([RECORD] * 20)[:300], "data/text.json": "hello world, not json\n",
    "data/one.json": json.dumps(RECORD, indent=2), "data/no_output.json": json.dumps([RECORD, {"instruction": "only"}]),
    "data/long.json": json.dumps([{"instruction": "Tell me a long story about a dog. " * 4, "output": "No."}] * 4),
    "data/story.txt": "Once upon a time there was a dog.\n" * 50, "data/bad_utf8.txt": b"\xff\xfe not utf-8\n",
    "tok/small.model": _small_tokenizer(), "tok/garbage.model": b"not a model",
    "models/cut.bin": STORIES.read_bytes()[:500_000], "models/model.xyz": b"what is this",
  }
  for rel, data in files.items(): _write(root, rel, data)
  (root / "emptydir").mkdir()
  (root / "dir.model").mkdir()
  return root


def snapshot(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*"))}


# ---- CLI cases: (id, argv with {W} for the user's folder, regex the one line must match) --------------
M, TK, LT = str(STORIES), str(TOK512), str(LLAMA_TOK)
GEN = ["generate", "--model", D, "--prompt", "Once"]
FT = ["finetune", "--model", M, "--tokenizer", TK, "--data", "{W}/data/records.jsonl"]
FT_OK = FT[:-1] + [str(ALPACA), "--out", "{W}/new_run"]
CONV = ["convert", M, "--tokenizer", TK, "--to"]
CLI_CASES = [
  # generate / chat: flags, devices, files
  ("gen-missing-model", ["generate", "--model", "{W}/nope.bin", "--prompt", "x"], r"model not found: .*nope\.bin"),
  ("gen-missing-tokenizer", ["generate", "--model", M, "--tokenizer", "{W}/nope.model", "--prompt", "x"], r"tokenizer not found"),
  ("gen-garbage-tokenizer", ["generate", "--model", M, "--tokenizer", "{W}/tok/garbage.model", "--prompt", "x"],
   r"not a SentencePiece tokenizer"),
  ("gen-tokenizer-too-big", ["generate", "--model", D, "--tokenizer", LT, "--prompt", "x"], r"32000 pieces but the model only 512"),
  ("gen-dir-not-a-model", ["generate", "--model", "{W}/emptydir", "--prompt", "x"], r"neither config\.json nor params\.json"),
  ("gen-truncated-model", ["generate", "--model", "{W}/models/cut.bin", "--prompt", "x"], r"truncated llama2\.c checkpoint"),
  ("gen-unknown-format", ["generate", "--model", "{W}/models/model.xyz", "--prompt", "x"], r"unknown model format"),
  ("gen-no-such-device", GEN + ["--device", "NOSUCH"], r"device 'NOSUCH': tinygrad has no such device; devices that work here: .*CPU"),
  ("gen-device-not-here", GEN + ["--device", "METAL"], r"device 'METAL' does not work on this machine .*devices that work here: .*CPU"),
  ("gen-device-compiler", GEN + ["--device", "CPU:LLVM"], r"names a compiler.*DEV=CPU:LLVM"),
  ("gen-negative-temperature", GEN + ["--temperature", "-1"], r"--temperature must be >= 0"),
  ("gen-top-p", GEN + ["--top-p", "2"], r"top_p must be in \[0, 1\]"),
  ("gen-min-p", GEN + ["--min-p", "-0.5"], r"min_p must be in \[0, 1\]"),
  ("gen-typical-p", GEN + ["--typical-p", "0"], r"typical_p must be in \(0, 1\]"),
  ("gen-top-k", GEN + ["--top-k", "-3"], r"top_k must be >= 0"),
  ("gen-repetition-penalty", GEN + ["--repetition-penalty", "0"], r"repetition_penalty must be > 0"),
  ("gen-max-new-tokens", GEN + ["--max-new-tokens", "-1"], r"max_new_tokens must be >= 0"),
  ("gen-empty-stop", GEN + ["--stop", ""], r"stop strings must be non-empty strings"),
  ("gen-num-beams", GEN + ["--num-beams", "0"], r"num_beams must be >= 1"),
  ("gen-return-sequences", GEN + ["--num-return-sequences", "3"], r"num_return_sequences=3 must be between 1 and num_beams=1"),
  ("gen-beam-sampling", GEN + ["--num-beams", "2", "--temperature", "0.7"], r"beam search with do_sample=True"),
  ("gen-max-seq-len-zero", GEN + ["--max-seq-len", "0"], r"argument --max-seq-len: must be at least 1, got 0"),
  ("gen-max-seq-len-text", GEN + ["--max-seq-len", "long"], r"argument --max-seq-len: expected an integer, got 'long'"),
  ("gen-threads-zero", GEN + ["--threads", "0"], r"argument --threads: must be at least 1"),
  ("gen-eos-id-text", GEN + ["--eos-token-id", "eos"], r"argument --eos-token-id: invalid int value"),
  ("gen-dtype", GEN + ["--dtype", "int8"], r"argument --dtype: invalid choice: 'int8'"),
  ("gen-quantize", GEN + ["--quantize", "int3"], r"argument --quantize: invalid choice: 'int3'"),
  ("gen-rope-type", GEN + ["--rope-scaling", "bogus:2"], r"unknown rope_scaling type 'bogus'"),
  ("gen-rope-factor", GEN + ["--rope-scaling", "linear:fast"], r"--rope-scaling: expected TYPE:FACTOR"),
  ("gen-rope-json", GEN + ["--rope-scaling", "{bad json"], r"--rope-scaling: invalid JSON"),
  ("gen-rope-negative", GEN + ["--rope-scaling", "linear:-2"], r"rope_scaling factor must be positive"),
  ("gen-missing-adapter", GEN + ["--adapter", "{W}/nope"], r"adapter not found: .*nope"),
  ("gen-adapter-is-file", GEN + ["--adapter", "{W}/notes.txt"], r"adapter .*notes\.txt is a file"),
  ("gen-adapter-no-config", GEN + ["--adapter", "{W}/noconfig_adapter"], r"no adapter_config\.json"),
  ("gen-adapter-and-quantize", GEN + ["--adapter", "{W}/run/adapter", "--quantize", "int8"], r"adapter= with quantize= is not supported"),
  ("gen-prompt-not-utf8", ["generate", "--model", D, "--prompt", "caf\udce9"], r"--prompt is not valid UTF-8 \(byte 0xe9"),
  ("gen-no-prompt", ["generate", "--model", D], r"the following arguments are required: --prompt"),
  ("chat-prompt-not-utf8", ["chat", "--model", D, "--prompt", "\udcff"], r"--prompt is not valid UTF-8 \(byte 0xff"),
  ("chat-system-not-utf8", ["chat", "--model", D, "--prompt", "hi", "--system", "\udc80x"], r"--system is not valid UTF-8"),
  ("chat-missing-model", ["chat", "--model", "{W}/nope", "--prompt", "hi"], r"model not found"),
  # convert
  ("convert-gguf-wrong-vocab", ["convert", M, "--to", "gguf", "{W}/out.gguf", "--tokenizer", LT],
   r"32000 pieces but the model's vocabulary has 512 rows"),
  ("convert-hf-wrong-vocab", ["convert", M, "--to", "hf", "{W}/out_hf", "--tokenizer", LT], r"32000 pieces but the model's vocabulary has 512"),
  ("convert-hf-small-vocab", ["convert", M, "--to", "hf", "{W}/out_hf", "--tokenizer", "{W}/tok/small.model"],
   r"300 pieces but the model's vocabulary has 512"),
  ("convert-missing-tokenizer", ["convert", M, "--to", "hf", "{W}/out_hf", "--tokenizer", "{W}/nope.model"], r"tokenizer not found"),
  ("convert-hf-onto-file", CONV + ["hf", "{W}/notes.txt", "--force"], r"notes\.txt is a file, but a folder is written there"),
  ("convert-hf-nonempty", CONV + ["hf", "{W}/full"], r"full already exists and is not empty; .*--force"),
  ("convert-gguf-exists", CONV + ["gguf", "{W}/existing.gguf"], r"existing\.gguf already exists; .*--force"),
  ("convert-gguf-onto-dir", CONV + ["gguf", "{W}/emptydir", "--force"], r"emptydir is a folder; name a file"),
  ("convert-hf-q8", CONV + ["hf", "{W}/out_hf", "--dtype", "q8_0"], r"--dtype q8_0 is for --to gguf"),
  ("convert-meta-f16", CONV + ["meta", "{W}/out_meta", "--dtype", "f16"], r"Meta export writes f32"),
  ("convert-gguf-bf16", CONV + ["gguf", "{W}/out.gguf", "--dtype", "bf16"], r"GGUF export takes --dtype f32"),
  ("convert-missing-src", ["convert", "{W}/nope.bin", "--to", "hf", "{W}/out_hf"], r"model not found"),
  ("convert-bad-target", ["convert", M, "--to", "onnx", "{W}/out"], r"argument --to: invalid choice: 'onnx'"),
  ("convert-unwritable", CONV + ["hf", "/proc/tinyllama2-test/out"], r"cannot write in /proc"),
  # bench
  ("bench-new-tokens-zero", ["bench", "--new-tokens", "0"], r"argument --new-tokens: must be at least 4, got 0"),
  ("bench-prompt-len-zero", ["bench", "--prompt-len", "0"], r"argument --prompt-len: must be at least 1, got 0"),
  ("bench-repeats-zero", ["bench", "--repeats", "0"], r"argument --repeats: must be at least 1"),
  ("bench-json-unwritable", ["bench", "--json", "/proc/tinyllama2-test/r.json"], r"--json .*cannot write in /proc"),
  ("bench-no-such-model", ["bench", "--model", "{W}/nope.bin"], r"--model .*nope\.bin: no such file or folder, and not a shape"),
  ("bench-no-such-device", ["bench", "--device", "NOSUCH"], r"device 'NOSUCH': tinygrad has no such device"),
  ("bench-json-dir", ["bench", "--json", "{W}/emptydir"], r"--json .*emptydir is a folder"),
  # finetune / pretrain
  ("ft-resume-nothing", FT + ["--out", "{W}/new_run", "--resume"], r"--resume: no valid checkpoint found in .*new_run"),
  ("ft-resume-user-files", FT + ["--out", "{W}/run", "--resume"], r"--resume: no valid checkpoint found in .*run/checkpoints"),
  ("ft-out-is-file", FT + ["--out", "{W}/notes.txt"], r"--out .*notes\.txt is a file"),
  ("ft-out-nonempty", FT + ["--out", "{W}/run"], r"run already exists and is not empty: pass --resume"),
  ("ft-out-unwritable", FT + ["--out", "/proc/tinyllama2-test/run"], r"--out .*cannot write in /proc"),
  ("ft-seq-len-huge", FT_OK + ["--seq-len", "100000"], r"--seq-len 100000 with --batch-size 8 needs at least [\d.]+ GiB.*use --seq-len \d+ or less"),
  ("ft-seq-len-zero", FT_OK + ["--seq-len", "0"], r"argument --seq-len: must be at least 1, got 0"),
  ("ft-missing-data", FT[:-1] + ["{W}/nope.json", "--out", "{W}/new_run"], r"training data not found"),
  ("ft-jsonl-bad-line", FT + ["--out", "{W}/new_run"], r"records\.jsonl line 4: not valid JSON"),
  ("ft-alpaca-jsonl-bad-line", FT + ["--out", "{W}/new_run", "--format", "alpaca"], r"records\.jsonl line 4: not valid JSON"),
  ("ft-truncated-json", FT[:-1] + ["{W}/data/truncated.json", "--out", "{W}/new_run"], r"truncated\.json: not valid JSON \(.* line 1 column"),
  ("ft-json-suffix-text", FT[:-1] + ["{W}/data/text.json", "--out", "{W}/new_run"], r"text\.json: not JSON"),
  ("ft-one-object", FT[:-1] + ["{W}/data/one.json", "--out", "{W}/new_run"], r"one\.json: holds one JSON object"),
  ("ft-alpaca-on-text", FT[:-1] + ["{W}/data/story.txt", "--format", "alpaca", "--out", "{W}/new_run"], r"story\.txt: not JSON"),
  ("ft-text-not-utf8", FT[:-1] + ["{W}/data/bad_utf8.txt", "--out", "{W}/new_run"], r"bad_utf8\.txt: not UTF-8"),
  ("ft-record-no-output", FT[:-1] + ["{W}/data/no_output.json", "--out", "{W}/new_run"], r"no_output\.json record 1: .*'output'"),
  ("ft-all-dropped", FT[:-1] + ["{W}/data/long.json", "--seq-len", "8", "--out", "{W}/new_run"],
   r"long\.json: no usable records: all 4 dropped, their answer starts after the first 9 tokens"),
  ("ft-lora-r", FT_OK + ["--lora-r", "0"], r"argument --lora-r: must be at least 1"),
  ("ft-lora-dropout", FT_OK + ["--lora-dropout", "1"], r"argument --lora-dropout: must be less than 1"),
  ("ft-lora-alpha", FT_OK + ["--lora-alpha", "nan"], r"argument --lora-alpha: expected a finite number"),
  ("ft-target-modules", FT_OK + ["--target-modules", "attn"], r"unknown LoRA target module\(s\) \['attn'\]"),
  ("ft-freeze-without-full", FT_OK + ["--freeze", "layers.0.*"], r"--freeze / --freeze-layers need --full"),
  ("ft-no-such-device", FT_OK + ["--device", "NOSUCH"], r"device 'NOSUCH': tinygrad has no such device"),
  ("ft-lr-zero", FT_OK + ["--lr", "0"], r"argument --lr: must be greater than 0"),
  ("ft-batch-zero", FT_OK + ["--batch-size", "0"], r"argument --batch-size: must be at least 1"),
  ("ft-limit-zero", FT_OK + ["--limit", "0"], r"argument --limit: must be at least 1"),
  ("ft-seed-negative", FT_OK + ["--seed", "-1"], r"argument --seed: must be at least 0"),
  ("ft-bad-format", FT_OK + ["--format", "csv"], r"argument --format: invalid choice: 'csv'"),
  ("pretrain-missing-data", ["pretrain", "--data", "{W}/nope.txt", "--out", "{W}/new_run"], r"training data not found"),
  ("pretrain-bad-preset", ["pretrain", "--data", "{W}/data/story.txt", "--config", "huge", "--out", "{W}/new_run"],
   r"unknown --config 'huge'"),
  ("pretrain-heads", ["pretrain", "--data", "{W}/data/story.txt", "--n-heads", "3", "--out", "{W}/new_run"],
   r"dim 128 is not divisible by n_heads 3"),
  ("pretrain-resume-nothing", ["pretrain", "--data", "{W}/data/story.txt", "--out", "{W}/emptydir", "--resume"],
   r"no valid checkpoint found"),
  # merge
  ("merge-out-is-file", ["merge", "--model", M, "--tokenizer", TK, "--adapter", "{W}/run/adapter", "--out", "{W}/notes.txt"],
   r"--out .*notes\.txt is a file"),
  ("merge-out-nonempty", ["merge", "--model", M, "--adapter", "{W}/run/adapter", "--out", "{W}/full"], r"already exists and is not empty"),
  ("merge-missing-adapter", ["merge", "--model", M, "--adapter", "{W}/nope", "--out", "{W}/merged"], r"adapter not found"),
  ("merge-adapter-no-config", ["merge", "--model", M, "--adapter", "{W}/noconfig_adapter", "--out", "{W}/merged"],
   r"no adapter_config\.json"),
  ("merge-adapter-bad-config", ["merge", "--model", M, "--adapter", "{W}/run/adapter", "--out", "{W}/merged"],
   r"adapter_config\.json: missing 'r'|no adapter_model\.safetensors"),
  # vocab
  ("vocab-train-exists", ["vocab", "train", "--input", "{W}/data/story.txt", "--vocab-size", "300", "--out", "{W}/existing"],
   r"existing\.model already exists; choose another path or pass --force"),
  ("vocab-train-missing-input", ["vocab", "train", "--input", "{W}/nope.txt", "--vocab-size", "300", "--out", "{W}/v"],
   r"training text not found"),
  ("vocab-train-size", ["vocab", "train", "--input", "{W}/data/story.txt", "--vocab-size", "100", "--out", "{W}/v"],
   r"vocab_size must exceed 259"),
  ("vocab-train-out-dir", ["vocab", "train", "--input", "{W}/data/story.txt", "--vocab-size", "300", "--out", "{W}/dir", "--force"],
   r"--out .*dir\.model is a folder; name a file"),
  ("vocab-merge-exists", ["vocab", "merge", TK, LT, "--out", "{W}/existing.model"], r"existing\.model already exists.*--force"),
  ("vocab-merge-missing", ["vocab", "merge", "{W}/nope.model", TK, "--out", "{W}/m.model"], r"tokenizer not found"),
  ("vocab-merge-onto-dir", ["vocab", "merge", TK, LT, "--out", "{W}/emptydir", "--force"], r"emptydir is a folder"),
  ("vocab-merge-garbage", ["vocab", "merge", "{W}/tok/garbage.model", TK, "--out", "{W}/m.model"], r"SentencePiece"),
  ("vocab-resize-out-file", ["vocab", "resize", M, "--tokenizer", LT, "--out", "{W}/notes.txt"], r"--out .*notes\.txt is a file"),
  ("vocab-resize-missing-tok", ["vocab", "resize", M, "--tokenizer", "{W}/nope.model", "--out", "{W}/resized"], r"tokenizer not found"),
  ("vocab-resize-smaller", ["vocab", "resize", M, "--tokenizer", "{W}/tok/small.model", "--out", "{W}/resized"],
   r"300 pieces, fewer than the model's 512 rows"),
  # dispatcher, tune
  ("no-command", [], r"the following arguments are required: command"),
  ("unknown-command", ["train"], r"invalid choice: 'train'"),
  ("tune-beam-zero", ["tune", "--model", "stories260K", "--beam", "0"], r"argument --beam: must be at least 1"),
]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
  try: code = cli(argv)
  except SystemExit as e: code = e.code
  return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,pattern", [pytest.param(a, p, id=i) for i, a, p in CLI_CASES])
def test_cli_bad_input(ws, capsys, argv, pattern):
  if "/proc/" in " ".join(argv) and not Path("/proc/self").exists(): pytest.skip("needs Linux /proc (an unwritable folder)")
  if "METAL" in argv and sys.platform == "darwin": pytest.skip("METAL works on macOS")
  before = snapshot(ws)
  code, err = run_in_process([a.replace("{W}", str(ws)) for a in argv], capsys)
  lines = err.strip().splitlines()
  assert code not in (0, None), err
  assert "Traceback" not in err and len(lines) == 1, err
  assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
  assert snapshot(ws) == before


# ---- API cases ------------------------------------------------------------------------------------------
def _gen(**kw): return lambda llm: llm.generate("Once", max_new_tokens=2, **kw)


API_CASES = [
  ("load-missing", lambda llm: Llama.from_pretrained("/nonexistent/m.bin"), FileNotFoundError, r"model not found"),
  ("load-dtype", lambda llm: Llama.from_pretrained(D, dtype="int8"), ValueError, r"unknown dtype 'int8'"),
  ("load-quantize", lambda llm: Llama.from_pretrained(D, quantize="int3"), ValueError, r"unknown quantize='int3'"),
  ("load-max-seq-len", lambda llm: Llama.from_pretrained(D, max_seq_len=0), ValueError, r"max_seq_len must be a positive integer"),
  ("load-max-seq-len-float", lambda llm: Llama.from_pretrained(D, max_seq_len=1.5), ValueError, r"max_seq_len must be a positive integer"),
  ("load-device", lambda llm: Llama.from_pretrained(D, device="NOSUCH"), ValueError, r"no such device; devices that work here"),
  ("load-rope", lambda llm: Llama.from_pretrained(D, rope_scaling={"type": "su", "factor": 2}), ValueError, r"'su' is not supported"),
  ("load-rope-factor-text", lambda llm: Llama.from_pretrained(D, rope_scaling={"type": "linear", "factor": "2"}), ValueError,
   r"rope_scaling factor must be a number, got '2'"),
  ("gen-empty-stop", _gen(stop=[""]), ValueError, r"stop strings must be non-empty strings"),
  ("load-rope-not-dict", lambda llm: Llama.from_pretrained(D, rope_scaling="linear"), ValueError, r"rope_scaling must be a dict"),
  ("load-adapter", lambda llm: Llama.from_pretrained(D, adapter="/nonexistent/adapter"), FileNotFoundError, r"adapter not found"),
  ("gen-temperature", _gen(do_sample=True, temperature=0.0), ValueError, r"temperature=0.0 with do_sample=True"),
  ("gen-top-p", _gen(top_p=1.5), ValueError, r"top_p must be in \[0, 1\]"),
  ("gen-unknown-setting", _gen(max_length=5), ValueError, r"unknown generation setting\(s\) max_length"),
  ("gen-beams", _gen(num_beams=0), ValueError, r"num_beams must be >= 1"),
  ("gen-stream-beams", _gen(num_beams=2, stream=True), ValueError, r"stream=True returns one sequence"),
  ("gen-ids-outside", lambda llm: llm.generate([1, 600]), ValueError, r"token ids \[600\] are outside the vocabulary"),
  ("gen-too-long", lambda llm: llm.generate([1] * 600, max_new_tokens=1), ValueError, r"longer than max_seq_len 512"),
  ("gen-empty-prompt", lambda llm: llm.generate([]), ValueError, r"the prompt is empty"),
  ("gen-not-utf8", lambda llm: llm.generate("caf\udce9"), ValueError, r"not valid UTF-8 \(byte 0xe9"),
  ("encode-not-str", lambda llm: llm.tokenizer.encode(b"bytes"), TypeError, r"encode expects a str, got bytes"),
  ("chat-empty", lambda llm: llm.chat([]), ValueError, r"chat needs at least one message"),
  ("chat-role", lambda llm: llm.chat([{"role": "bot", "content": "hi"}]), ValueError, r"unknown role 'bot'"),
  ("chat-order", lambda llm: llm.chat([{"role": "assistant", "content": "hi"}]), ValueError, r"must alternate user/assistant"),
  ("logits-empty", lambda llm: llm.logits([]), ValueError, r"the prompt is empty"),
]


@pytest.mark.parametrize("call,exc,pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in API_CASES])
def test_api_bad_input(stories, call, exc, pattern):
  with pytest.raises(exc, match=pattern) as info:
    call(stories)
  assert "\n" not in str(info.value)


# ---- beyond the table -----------------------------------------------------------------------------------
def test_format_auto_decides_by_content(tmp_path):
  from tinyllama2.train.recipes import detect_format
  (tmp_path / "a.json").write_text(json.dumps([RECORD] * 3))
  (tmp_path / "b.data").write_text("\n".join(json.dumps(RECORD) for _ in range(27)) + "\n")
  (tmp_path / "c.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
  (tmp_path / "d.data").write_text("[Verse 1] is plain text when it does not parse?")
  (tmp_path / "e.log").write_text("Once upon a time.\n")
  assert detect_format(tmp_path / "a.json") == ("alpaca", "a JSON list of 3 Alpaca records")
  assert detect_format(tmp_path / "b.data") == ("alpaca", "JSONL of 27 Alpaca records")   # JSONL, whatever its name
  assert detect_format(tmp_path / "c.json") == ("sharegpt", "a JSON list of 1 ShareGPT records")
  assert detect_format(tmp_path / "e.log") == ("text", "plain text")
  with pytest.raises(ValueError, match=r"d\.data: not valid JSON"): detect_format(tmp_path / "d.data")   # never text


def test_jsonl_records_are_sft_rows_not_text(tmp_path):
  need(TOK512)
  from tinyllama2 import Tokenizer
  from tinyllama2.train import sft_blocks
  f = tmp_path / "records.jsonl"
  f.write_text("\n".join(json.dumps(RECORD) for _ in range(27)))
  assert len(sft_blocks(f, Tokenizer(TOK512), seq_len=64)) == 27


def test_dropped_records_warning_says_how_many_and_why(tmp_path):
  need(TOK512)
  from tinyllama2 import Tokenizer
  from tinyllama2.train import sft_blocks
  f = tmp_path / "d.json"
  f.write_text(json.dumps([RECORD] * 2 + [{"instruction": "Tell me a long story about a dog. " * 4, "output": "No."}] * 3))
  with pytest.warns(UserWarning, match=r"3 of 5 records dropped: their answer starts after the first 41 tokens \(--seq-len 40\)"):
    assert len(sft_blocks(f, Tokenizer(TOK512), seq_len=40)) == 2


def test_a_short_tokenizer_decodes_every_id(ws):
  """A tokenizer with fewer pieces than the model's rows: ids past its end decode as unknown, never IndexError."""
  from tinyllama2 import Tokenizer
  tok = Tokenizer(ws / "tok" / "small.model")
  assert tok.vocab_size == 300 and tok.decode([1, 400, 511]) == tok.decode([1, 0, 0])
  llm = Llama.from_pretrained(STORIES, tokenizer=ws / "tok" / "small.model")
  g = llm.generate([1] + list(range(300, 320)), max_new_tokens=8)   # a prompt that leads outside the tokenizer
  assert len(g.tokens) == 8 and isinstance(g.text, str)


def test_bug_reports_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
  from tinyllama2.cli import convert
  def broken(a): raise KeyError("oops")
  monkeypatch.setattr(convert, "main", broken)
  assert cli(["convert", "x", "--to", "hf", "y"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error: KeyError: 'oops'" in err and "this is a bug, please report it" in err
  assert "Traceback" not in err
  for argv in (["--debug", "convert", "x", "--to", "hf", "y"], ["convert", "x", "--to", "hf", "y", "--debug"]):
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err


def test_warnings_print_one_plain_line(capsys):
  import argparse
  import warnings
  from tinyllama2.cli import run_cli
  def warn(a): warnings.warn("something to know", stacklevel=2)
  assert run_cli(warn, argparse.Namespace()) == 0
  assert capsys.readouterr().err == "warning: something to know\n"


def test_convert_ignores_and_cleans_a_killed_runs_temp_file(tmp_path, capsys):
  """A kill during an atomic write leaves .NAME.XXXXXXXX.tmp: the folder still counts as empty, and the leftover goes."""
  need(STORIES, TOK512)
  out = tmp_path / "hf"
  out.mkdir()
  (out / ".model.safetensors.abcd1234.tmp").write_bytes(b"half written")
  (tmp_path / ".hf.wxyz5678.tmp").mkdir()   # a killed run's temp folder beside the output
  assert cli(["convert", str(STORIES), "--to", "hf", str(out), "--tokenizer", str(TOK512)]) == 0, capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_write_dir_leaves_the_output_alone_when_writing_fails(tmp_path):
  from tinyllama2.fileio import write_dir
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  def fail(d: Path) -> None:
    (d / "keep.txt").write_text("half")
    raise OSError(28, "No space left on device")
  with pytest.raises(OSError):
    write_dir(out, fail)
  assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- real processes: nothing of this reaches a user's terminal as a traceback ---------------------------
def _run(args: list, env: dict | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, cwd=ROOT, timeout=300, input=stdin,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,env,stdin,pattern", [
  pytest.param(["-m", "tinyllama2.cli", "generate", "--model", D, "--prompt", b"caf\xe9"], None, None,
               rb"--prompt is not valid UTF-8", id="argv-bytes"),
  pytest.param(["examples/chat.py", "--max-new-tokens", "4"], None, b"\xff\xfe\n", rb"not valid UTF-8", id="chat-stdin"),
  pytest.param(["-m", "tinyllama2.cli", "generate", "--model", D, "--prompt", "x"], {"DEV": "NOSUCH"}, None,
               rb"DEV=NOSUCH: tinygrad has no such device; devices that work here: .*CPU", id="dev-env"),
  pytest.param(["examples/chat.py", "--temperature", "-1"], None, None, rb"argument --temperature: must be at least 0", id="example-flag"),
  pytest.param(["examples/finetune_lora.py", "--model", str(STORIES), "--data", str(ALPACA), "--out", "{T}", "--resume"],
               None, None, rb"no valid checkpoint found", id="example-resume"),
])
def test_subprocess_shows_no_traceback(tmp_path, args, env, stdin, pattern):
  need(STORIES, ALPACA)
  args = [a.replace("{T}", str(tmp_path / "run")) if isinstance(a, str) else a for a in args]
  r = _run(args, env, stdin)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 or (r.returncode == 2 and b"argument" in r.stderr), r.stderr
  assert b"Traceback" not in r.stderr and len(lines) == 1, r.stderr
  assert re.search(pattern, lines[0]), lines[0]
  assert list(tmp_path.iterdir()) == []
