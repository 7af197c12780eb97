"""Replaying a captured decode step on tinygrad's HCQ2 CPU queue with less Python per call.

A TinyJit call costs ~0.4 ms of host Python in tinygrad 0.14 before the queue sees it (`_prepare_jit_inputs`,
`run_linear`, `exec_hcq`, `exec_kernel`: the parameters of every buffer in the graph are resolved again on each
call), although a captured graph on the HCQ2 queue is a single compiled submit program whose only per-call
inputs are the values of its Variables. For a small model that is a quarter of a decode step (stories15M int4:
~2 ms per token). `Replay` keeps that program, its buffers and the step's output from the captured JIT and calls
the program with new Variable values, which is what tinygrad's `exec_kernel` ends up doing.

It relies on tinygrad internals (the layout of a captured HCQ2 call), so it only takes a graph that looks exactly
as expected — one or more `hcq` calls, no tensor inputs, no per-call input tables — on a CPU device, and steps
aside for tinygrad's own replay otherwise and whenever DEBUG or PROFILE want to see the calls.

tinygrad 0.14 internals used: `TinyJit.captured` (`.linear.src`, `.ret`), the CALL/CUSTOM_FUNCTION "hcq" UOps of a
captured HCQ2 graph and their `arg.aux` (`input_idxs`, `inputs`), `engine.realize.get_runtime`, `resolve_params`,
`unwrap_multi`, `Buffer.ensure_allocated().get_buf`, and a program's `arg.launch_dims` / `arg.vals`.
"""
from __future__ import annotations

from tinygrad import UOp
from tinygrad.helpers import DEBUG, PROFILE, getenv
from tinygrad.uop.ops import Ops


class Replay:
  """Calls the submit programs of a captured TinyJit (see the module docstring); returns the JIT's output."""

  def __init__(self, jit, variables: tuple[UOp, ...]):
    from tinygrad.engine.realize import get_runtime, resolve_params, unwrap_multi
    self.ret, self.variables, self.programs = jit.captured.ret, variables, []
    for call in jit.captured.linear.src:
      program = call.src[0].src[0]
      (bufs, device_vars), = unwrap_multi(call, [resolve_params(call, ())[i] for i in program.arg.globals])
      device = call.src[1].device
      self.programs.append((get_runtime(device, program), [b.ensure_allocated().get_buf(device) for b in bufs], program.arg))

  @staticmethod
  def of(jit, variables: tuple[UOp, ...]) -> Replay | None:
    """A Replay of `jit` (captured already), or None when its graph is not the simple kind this handles."""
    if not getenv("HCQ2") or DEBUG >= 2 or PROFILE or jit.captured is None: return None
    names = {v.expr for v in variables}
    for call in jit.captured.linear.src:
      if not (call.op is Ops.CALL and call.src[0].op is Ops.CUSTOM_FUNCTION and call.src[0].arg == "hcq"): return None
      info, program = call.arg.aux, call.src[0].src[0]
      if program.op is not Ops.PROGRAM or info.input_idxs or info.inputs is not None: return None
      device = call.src[1].device
      if not isinstance(device, str) or not device.startswith("CPU"): return None
      if any(v.expr not in names for v in program.arg.vars): return None
    return Replay(jit, variables)

  def __call__(self, *values: int):
    """Run the captured step with these values of the Variables (in the order given to `of`)."""
    var_vals = {}
    for var, value in zip(self.variables, values, strict=True):
      if not var.vmin <= value <= var.vmax: raise ValueError(f"{var.expr}={value} is outside [{var.vmin}, {var.vmax}]")
      var_vals[var.expr] = value
    for runtime, bufs, info in self.programs:
      global_size, local_size = info.launch_dims(var_vals)
      runtime(*bufs, global_size=global_size, local_size=local_size, vals=info.vals(var_vals))
    return self.ret


def capture_at_first_call(jit):
  """`jit` (a new TinyJit) set to capture its graph on its first call instead of its second: tinygrad 0.14 runs a
  TinyJit's first call uncaptured (`cnt == 0`), which schedules the whole graph once more — seconds for a prefill
  graph on a small CPU — although our graphs read only buffers that are already realized. Uses `TinyJit.cnt`."""
  jit.cnt = 1
  return jit
