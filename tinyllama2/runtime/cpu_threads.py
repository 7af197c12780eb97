"""Helper threads that let one CPU decode kernel use every core.

tinygrad 0.14 runs each CPU kernel on a single worker thread, and one core streams only ~10 GB/s on our 2-core
test machine where two reach ~17 GB/s, so a decode step that is one matrix-vector product after another stays
at one core's bandwidth. Here every other core runs a small C loop (compiled once with clang, started as a
daemon thread) that watches a mailbox. A kernel from cpu_kernels.py posts itself there — its own address and
its buffer pointers — then both the kernel's thread and the helpers take chunks of output rows from a shared
counter until none are left; the kernel returns only after every helper that joined has finished. A helper
that is asleep or late simply finds no chunks, so a kernel never waits for one that did not join.

With tinygrad's HCQ2 queue (which tinyllama2 turns on for the CPU) kernels run on a queue worker thread while
the host thread waits for them; that waiting thread is one of the helpers. So on two cores a decode step runs
on exactly two threads, the queue's worker and the host, as llama.cpp's does: a third thread would make the OS
time-share the cores, and a helper descheduled while holding a chunk stalls the whole kernel.

The mailbox lives in private (copy-on-write) memory, so a forked child never shares it with the parent's
helpers. Kernels take their own address with inline assembly, which exists here for x86-64 only; elsewhere
the kernels run their rows on one thread as before.

tinygrad 0.14 internals used: the CPU device's `_wait_signal(signal, value, timeout)` (replaced per device), its
`wait_timeout_ms` and `on_device_hang`, a signal's `addr` and `fmt`, and `Tensor.from_blob` for the mailbox.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import threading
import time
import types
import warnings
from dataclasses import dataclass

from tinygrad import Device, Tensor, dtypes

# mailbox words, each on its own 64-byte line where threads write it concurrently
SEQ, CLAIM, DONE, STATE, NEXT, FN, ARGS, JOINED = 0, 8, 16, 24, 32, 40, 41, 56
MAX_ARGS = 10   # the helper passes ARGS..ARGS+9 (a kernel declaring fewer ignores the rest)
MAILBOX_WORDS = 64
CLOSED = 1 << 7   # CLAIM = seq << 8 | CLOSED flag | number of helpers that joined

_HELPER_C = r"""
#include <time.h>
typedef unsigned long long u64;
typedef void (*tl_kernel)(u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);

static inline void tl_pause(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

static u64 tl_now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (u64)t.tv_sec * 1000000000ull + (u64)t.tv_nsec;
}

/* Work on the kernel posted as sequence number s, if its chunks are still open. */
static void tl_join(u64* mb, u64 s) {
  u64 c = __atomic_load_n(&mb[TL_CLAIM], __ATOMIC_ACQUIRE);
  while ((c >> 8) == s && !(c & TL_CLOSED)) {
    if (__atomic_compare_exchange_n(&mb[TL_CLAIM], &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      ((tl_kernel)mb[TL_FN])(mb[TL_ARGS], mb[TL_ARGS + 1], mb[TL_ARGS + 2], mb[TL_ARGS + 3], mb[TL_ARGS + 4], mb[TL_ARGS + 5],
                          mb[TL_ARGS + 6], mb[TL_ARGS + 7], mb[TL_ARGS + 8], mb[TL_ARGS + 9]);
      __atomic_fetch_add(&mb[TL_JOINED], 1, __ATOMIC_RELAXED);   /* statistics: kernels a helper worked on */
      __atomic_fetch_add(&mb[TL_DONE], 1, __ATOMIC_RELEASE);
      return;
    }
  }
}

static void tl_nap(u64 ns) {
  struct timespec nap = {0, (long)ns};
  nanosleep(&nap, 0);
}

/* Watch the mailbox forever: spin while kernels keep coming, nap once it has been idle for spin_ns. */
void tl_helper(u64* mb, u64 spin_ns) {
  u64 seen = __atomic_load_n(&mb[TL_SEQ], __ATOMIC_ACQUIRE), last = tl_now_ns();
  for (;;) {
    u64 s = __atomic_load_n(&mb[TL_SEQ], __ATOMIC_ACQUIRE);
    if (s == seen) {
      for (int i = 0; i < 32; i++) tl_pause();
      u64 idle = tl_now_ns() - last;
      if (idle > spin_ns) tl_nap(idle > 100 * spin_ns ? 5000000 : 50000);   /* long idle (a chat waiting for input): 5 ms naps */
      continue;
    }
    seen = s;
    tl_join(mb, s);
    last = tl_now_ns();
  }
}

/* The host thread waiting for a tinygrad queue (until *signal >= value) is a helper meanwhile, and the only one
   on two cores: the step then runs on the queue's worker and this thread, with no third thread for the OS to
   time-share with them (a descheduled helper holding a chunk stalls the whole kernel). Spins while kernels keep
   coming, naps once idle for spin_ns; returns 1 at the signal, 0 when limit_ns passed first. */
int tl_wait_helping(u64* mb, const volatile u64* signal, u64 value, u64 spin_ns, u64 limit_ns) {
  u64 seen = ~0ull, start = tl_now_ns(), last = start;
  while (__atomic_load_n(signal, __ATOMIC_ACQUIRE) < value) {
    u64 s = __atomic_load_n(&mb[TL_SEQ], __ATOMIC_ACQUIRE);
    if (s != seen) {   /* a kernel posted before this wait began is joined too, while its chunks last */
      seen = s;
      tl_join(mb, s);
      last = tl_now_ns();
      continue;
    }
    for (int i = 0; i < 32; i++) tl_pause();
    u64 now = tl_now_ns();
    if (now - start > limit_ns) return 0;
    if (now - last > spin_ns) tl_nap(50000);
  }
  return 1;
}
"""


@dataclass
class Config:
  """How many threads a CPU decode kernel may use (the kernel's own thread and threads-1 helpers)."""
  threads: int = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
  spin_ns: int = 2_000_000   # helpers spin this long after the last kernel before they start to nap


config = Config()


def set_threads(threads: int) -> None:
  """Threads per CPU decode kernel (1 = no helpers); must be set before the first kernel runs."""
  if threads < 1: raise ValueError(f"threads must be at least 1, got {threads}")
  if pool.cache_info().currsize and threads != config.threads:
    raise RuntimeError(f"the CPU kernels already run with {config.threads} threads; set threads before loading a model")
  config.threads = threads


@dataclass
class Pool:
  device: str
  mailbox: Tensor            # uint64 [MAILBOX_WORDS], a tinygrad view of private memory
  memory: ctypes.Array       # keeps the mailbox memory alive
  address: int               # the mailbox's first word (64-byte aligned, inside `memory`)
  helpers: list[threading.Thread]   # threads of their own
  host_helps: bool           # a host thread waiting for the device is a helper too

  def kernels_joined(self) -> int:
    """How many kernel calls a helper has worked on so far (the helpers count them in the mailbox)."""
    return ctypes.c_uint64.from_address(self.address + 8 * JOINED).value


def supported() -> bool:
  """Kernels find their own address with x86-64 inline assembly (a RIP-relative lea that tinygrad's ELF loader
  can relocate); other machines keep one thread per kernel."""
  return platform.machine().lower() in ("x86_64", "amd64")


def _defines() -> str:
  return "".join(f"#define TL_{name} {value}\n" for name, value in
                 dict(SEQ=SEQ, CLAIM=CLAIM, DONE=DONE, STATE=STATE, NEXT=NEXT, FN=FN, ARGS=ARGS, JOINED=JOINED,
                      CLOSED=CLOSED).items())


@functools.cache
def _helper_library() -> ctypes.CDLL:
  """Compile the helper loop with clang (tinygrad's CPU backend needs it anyway), cached by source hash in the
  user's cache directory."""
  source = _defines() + _HELPER_C
  digest = hashlib.sha256(source.encode()).hexdigest()[:16]
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinyllama2")
  os.makedirs(cache, mode=0o700, exist_ok=True)   # the user's own cache, not a shared temporary directory
  path = os.path.join(cache, f"cpu-helper-{digest}.so")
  if not os.path.exists(path):
    partial = f"{path}.{os.getpid()}.tmp"
    cc = os.environ.get("CC", "clang")
    try:
      subprocess.run([cc, "-x", "c", "-O2", "-shared", "-fPIC", "-", "-o", partial], input=source.encode(), check=True,
                     capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
      raise RuntimeError(f"could not compile the CPU helper thread with {cc}: {getattr(e, 'stderr', b'') or e}") from e
    os.replace(partial, path)
  lib = ctypes.CDLL(path)
  lib.tl_helper.argtypes, lib.tl_helper.restype = [ctypes.c_uint64, ctypes.c_uint64], None
  lib.tl_wait_helping.argtypes, lib.tl_wait_helping.restype = [ctypes.c_uint64] * 5, ctypes.c_int
  return lib


def _helping_wait(self, signal, value: int, timeout: int | None = None) -> None:
  """Host-side wait for a CPU queue that works on posted kernels until the queue reaches `value` (replaces
  tinygrad's HCQ2 wait, which spins in Python for the whole step and so takes the core a helper needs)."""
  addr = getattr(signal, "addr", None)
  if addr is None or getattr(signal, "fmt", "Q") != "Q": return _napping_wait(self, signal, value, timeout)
  lib, mailbox = _helper_library(), self._tinyllama2_mailbox
  start, limit = time.perf_counter(), (timeout or self.wait_timeout_ms) / 1000
  while not lib.tl_wait_helping(mailbox, addr, value, config.spin_ns, 100_000_000):   # back to Python every 0.1 s
    if time.perf_counter() - start > limit: self.on_device_hang()


def _napping_wait(self, signal, value: int, timeout: int | None = None) -> None:
  """A wait that spins only briefly, then sleeps (for signals _helping_wait cannot read)."""
  start = time.perf_counter()
  limit = (timeout or self.wait_timeout_ms) / 1000
  while signal[0] < value:
    waited = time.perf_counter() - start
    if waited > 200e-6: time.sleep(50e-6)
    if waited > limit: self.on_device_hang()


def _host_helps() -> bool:
  """Whether kernels run on tinygrad's queue worker while the host thread waits for them (HCQ2, as
  tinyllama2/__init__.py sets it for CPU runs): then the waiting thread is a helper. Otherwise kernels run on
  the calling thread itself and every helper is a thread of its own."""
  from tinygrad.helpers import getenv
  return bool(getenv("HCQ2"))


@functools.cache
def pool(device: str) -> Pool | None:
  """The helpers of a CPU device, started on first use; None when kernels there run on one thread."""
  if config.threads < 2 or not supported(): return None
  try: lib = _helper_library()
  except (OSError, RuntimeError) as e:
    warnings.warn(f"CPU decode kernels stay on one thread: {e}", stacklevel=2)
    return None
  memory = (ctypes.c_uint64 * (MAILBOX_WORDS + 8))()
  address = (ctypes.addressof(memory) + 63) // 64 * 64
  mailbox = Tensor.from_blob(address, (MAILBOX_WORDS,), dtype=dtypes.uint64, device=device)
  dev = Device[device]
  host_helps = _host_helps() and hasattr(dev, "_wait_signal")
  helpers = [threading.Thread(target=lib.tl_helper, args=(address, config.spin_ns), daemon=True, name=f"tinyllama2-cpu-{i}")
             for i in range(1, config.threads - int(host_helps))]
  for h in helpers: h.start()
  if host_helps:
    dev._tinyllama2_mailbox = address
    dev._wait_signal = types.MethodType(_helping_wait, dev)
  elif hasattr(dev, "_wait_signal"): dev._wait_signal = types.MethodType(_napping_wait, dev)
  return Pool(device, mailbox, memory, address, helpers, host_helps)


def parallel_rows(name: str, n_rows: int, rows_per_chunk: int, n_params: int, rows: str, prologue: str = "") -> str:
  """C (before str.format) for a kernel `name` whose params are {0}..{n_params-1}, the last of them the
  mailbox: `rows` computes output rows [tl_lo, tl_hi); this splits them into chunks that helpers share. Every
  thread runs `prologue` (per-thread set-up, e.g. quantizing x) once, after the kernel is posted.

  A helper calls the kernel with the mailbox address tagged (+1). An untagged call is tinygrad's: it takes the
  mailbox with a compare-and-swap on STATE, or, should another kernel hold it (two tinygrad threads running
  kernels at once), does all its rows alone with a private chunk counter instead of corrupting the other's."""
  if n_params > MAX_ARGS: raise ValueError(f"a parallel kernel takes at most {MAX_ARGS} buffers, {name} has {n_params}")
  n_chunks = -(-n_rows // rows_per_chunk)
  post_args = "".join(f"    tl_mb[TL_ARGS + {i}] = (u64)({{{i}}});\n" for i in range(n_params - 1))
  return _defines() + f"""typedef unsigned long long u64;
u64 tl_arg = (u64)({{{n_params - 1}}});
u64* tl_mb = (u64*)(tl_arg & ~1ull);
int tl_main = 0;
u64 tl_own_next = 0, *tl_next = &tl_own_next;
if (!(tl_arg & 1)) {{
  u64 tl_idle = 0;
  tl_main = __atomic_compare_exchange_n(&tl_mb[TL_STATE], &tl_idle, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}} else tl_next = &tl_mb[TL_NEXT];
u64 tl_seq = 0;
if (tl_main) {{
  u64 tl_self;
  __asm__("leaq {name}(%%rip), %0" : "=r"(tl_self));
  tl_seq = tl_mb[TL_SEQ] + 1;
  tl_mb[TL_FN] = tl_self;
{post_args}    tl_mb[TL_ARGS + {n_params - 1}] = tl_arg | 1;
  tl_mb[TL_NEXT] = 0;
  tl_mb[TL_DONE] = 0;
  tl_next = &tl_mb[TL_NEXT];
  __atomic_store_n(&tl_mb[TL_CLAIM], tl_seq << 8, __ATOMIC_RELEASE);
  __atomic_store_n(&tl_mb[TL_SEQ], tl_seq, __ATOMIC_RELEASE);
}}
{prologue}for (;;) {{
  long tl_chunk = (long)__atomic_fetch_add(tl_next, 1, __ATOMIC_RELAXED);
  if (tl_chunk >= {n_chunks}) break;
  int tl_lo = (int)tl_chunk * {rows_per_chunk};
  int tl_hi = tl_lo + {rows_per_chunk} < {n_rows} ? tl_lo + {rows_per_chunk} : {n_rows};
{rows}
}}
if (tl_main) {{
  u64 tl_claim = __atomic_load_n(&tl_mb[TL_CLAIM], __ATOMIC_ACQUIRE);
  while (!__atomic_compare_exchange_n(&tl_mb[TL_CLAIM], &tl_claim, tl_claim | TL_CLOSED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
  while (__atomic_load_n(&tl_mb[TL_DONE], __ATOMIC_ACQUIRE) < (tl_claim & (TL_CLOSED - 1))) __builtin_ia32_pause();
  __atomic_store_n(&tl_mb[TL_STATE], 0, __ATOMIC_RELEASE);
}}
"""
