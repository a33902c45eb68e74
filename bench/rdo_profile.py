"""Where one RDO optimizer step's time goes on this machine, and how fast its matrix multiplies run (not part of CI).

1. torch.profiler over one rdo.loss_and_grad step (after a warm-up step) on bench/rdo_step.py's 16 examples of
   Qwen2.5-Coder-0.5B-Instruct: self time of matrix multiplies, attention and everything else, and the top ops.
2. The rate of a bare matmul of the step's shapes for 32-1024 rows: times the 896 x 4864 MLP weight, and times
   the 896 x 151936 LM head: how much larger micro-batches (more rows per matmul) could gain, where the step is
   mostly matmuls (README, under the speed table).
3. With --compile: the same step in eager mode twice, then with the model compiled in place (torch.compile,
   inductor, dynamic shapes): how long the first step takes (the compiling), the next three, and whether the
   gradient agrees.

  python bench/rdo_profile.py [--dtype bfloat16] [--micro-batch 2] [--compile]
"""
import argparse, json, os, sys, time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
import rdo_step  # noqa: E402
from rdo_step import LAMBDAS, LAYER, MODEL  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--micro-batch", type=int, default=2)
p.add_argument("--compile", action="store_true", help="also time the step with the model compiled (3.)")
p.add_argument("--examples", default="runs/bench/rdo_step_examples.json", help="written by bench/rdo_step.py")
args = p.parse_args()
if not os.path.isfile(args.examples):
    sys.exit(f"{args.examples} not found: run python bench/rdo_step.py first")

model, tok = C.load_model(MODEL, "cpu", args.dtype)
batch = [tuple(e) for e in json.load(open(args.examples))]
batch = rdo_step.with_clean_states(model, tok, batch, args.micro_batch)[0]  # as rdo.py's loop has them
r0 = torch.nn.functional.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)), dim=0)


def step():
    """One rdo.py step from r0: (loss, dL/dr)."""
    r = r0.clone().requires_grad_(True)
    return rdo.loss_and_grad(model, tok, r, batch, 12.0, LAYER, LAMBDAS, args.micro_batch)["loss"], r.grad


step()  # warm-up
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.time()
    step()
    seconds = time.time() - t
ops = prof.key_averages()
total = sum(e.self_cpu_time_total for e in ops)
share = lambda keep: sum(e.self_cpu_time_total for e in ops if keep(e.key)) / total
print(f"\n1. one rdo.py step, {args.dtype}, micro-batch {args.micro_batch}, {torch.get_num_threads()} threads: "
      f"{seconds:.1f} s under the profiler")
print(f"  matrix multiplies {share(lambda k: k in MATMUL):.1%}, attention {share(lambda k: 'attention' in k):.1%}, "
      f"the rest {share(lambda k: k not in MATMUL and 'attention' not in k):.1%}")
for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]:
    print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / total:6.1%} {e.count:7d} calls")

dtype = getattr(torch, args.dtype)
print(f"\n2. GFLOP/s of a bare {args.dtype} matmul, rows x 896 times 896 x N")
print(f"  {'rows':>5s} {'N=4864 (MLP)':>13s} {'N=151936 (LM head)':>19s}")
for m in (32, 64, 128, 256, 512, 1024):
    rates = []
    for n, repeats in ((4864, 20), (151936, 3)):
        a, b = torch.randn(m, 896, dtype=dtype), torch.randn(896, n, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(2 * m * 896 * n * repeats / (time.perf_counter() - t) / 1e9)
    print(f"  {m:5d} {rates[0]:13.0f} {rates[1]:19.0f}")

if args.compile:
    def timed_step():
        t = time.time()
        loss, grad = step()
        return time.time() - t, loss, grad

    eager = [timed_step() for _ in range(2)]
    model.compile(dynamic=True)  # in place: rdo.py's hooks stay on the same modules
    t = time.time()
    timed_step()
    first = time.time() - t
    compiled = [timed_step() for _ in range(3)]
    g = eager[0][2]
    diff = ((g - compiled[0][2]).norm() / g.norm()).item()
    print(f"\n3. model.compile(dynamic=True) over the same rdo.py step: the first step {first:.0f} s (compiling a "
          f"graph per hook set and grad mode); then")
    for name, runs in (("eager", eager), ("compiled", compiled)):
        print(f"  {name:9s} {', '.join(f'{x[0]:.1f}' for x in runs)} s per step, loss {runs[0][1]:.5f}")
    print(f"  gradient's relative difference, compiled vs eager: {diff:.1e}")
