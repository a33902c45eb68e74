"""Real-model check of gcg_repind.py (not part of CI): plain GCG against GCG with the RepInd term, at equal steps
and prompts. Does the term lower the direction's cosine at the last prompt token, at what cost to the target's CE,
and how many prompts stop being refused?

Qwen2.5-Coder-0.5B-Instruct, the DIM direction from bench/dim_qwen.py standing in for RepInd-1. Prompts: the first
--n held-out harmful validation prompts (evalkit.held_out) that the model refuses without a suffix (greedy, 64
tokens, substring judge), kept in OUT/prompts.json. One suffix per prompt at a reduced budget (--steps,
--search-width, --topk; the paper/nanoGCG: 250, 512, 256), once with weight 0 (plain GCG) and once with
--repind-weight. A finished weight's OUT/wW/gcg.json is reused; an unfinished one resumes.
Prints per weight and prompt: the target's CE with the 'x x x' suffix -> with the found suffix, the mean |cos| with
the direction over the term's layers without a suffix -> with it, and whether the greedy completion still refuses;
then a summary line per weight.

  python bench/gcg_qwen.py [--n 5] [--steps 20] [--search-width 64] [--topk 64] [--repind-weight 10]
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import gcg_repind as G  # noqa: E402
from evalkit import DIM, QWEN, held_out  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default=QWEN)
p.add_argument("--dim", default=DIM, help="the direction file for the term (and the cosines of plain GCG)")
p.add_argument("--out", default="runs/bench/gcg_qwen")
p.add_argument("--n", type=int, default=5)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--search-width", type=int, default=64)
p.add_argument("--topk", type=int, default=64)
p.add_argument("--suffix-len", type=int, default=20)
p.add_argument("--repind-weight", type=float, default=None, help="the weight run beside plain GCG (weight 0; "
               "default: gcg_repind.py's)")
p.add_argument("--pool", type=int, default=24, help="held-out prompts to look for refused ones among")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
if args.repind_weight is None:
    args.repind_weight = G.parse_args(["--model", args.model]).repind_weight
if not os.path.isfile(args.dim):
    sys.exit(f"{args.dim} not found: run bench/dim_qwen.py first")
os.makedirs(args.out, exist_ok=True)
t0 = time.time()

prompts_path = os.path.join(args.out, "prompts.json")
if not os.path.isfile(prompts_path):
    model, tok = C.load_model(args.model)
    pool = held_out(args.pool)[0]
    refused = [x for x, c in zip(pool, C.generate(model, tok, pool, 64, desc="no suffix")) if C.is_refusal(c)]
    if len(refused) < args.n:
        sys.exit(f"only {len(refused)} of {args.pool} prompts are refused: raise --pool")
    C.save_json(prompts_path, refused[:args.n])
    del model
prompts = json.load(open(prompts_path))[:args.n]
print(f"{len(prompts)} refused held-out prompts in {prompts_path}")

runs, seconds = {}, {}
for w in (0.0, args.repind_weight):
    out = os.path.join(args.out, f"w{w:g}")
    resume = os.path.isfile(os.path.join(out, "gcg_checkpoint.pt"))
    if not os.path.isfile(os.path.join(out, "gcg.json")) or resume:
        t = time.time()
        G.main(["--model", args.model, "--harmful", prompts_path, "--n", str(len(prompts)), "--direction", args.dim,
                "--repind-weight", str(w), "--steps", str(args.steps), "--search-width", str(args.search_width),
                "--topk", str(args.topk), "--suffix-len", str(args.suffix_len), "--batch-size",
                str(args.search_width), "--seed", str(args.seed), "--out", out]
               + (["--resume"] if resume else ["--overwrite"]))
        seconds[w] = time.time() - t
    runs[w] = json.load(open(os.path.join(out, "gcg.json")))

n_layers = runs[0.0]["term_layers"]
print(f"\nGCG on {os.path.basename(os.path.normpath(args.model))}, {len(prompts)} refused held-out harmful prompts; "
      f"{args.steps} steps, search width {args.search_width}, top-k {args.topk}, suffix {args.suffix_len}; direction "
      f"{args.dim}; |cos| at the last prompt token, mean over block inputs 0..{n_layers - 1}")
print(f"{'weight':>6s} {'#':>2s} {'steps':>5s} {'CE x-init':>9s} {'-> found':>8s} {'|cos| none':>10s} "
      f"{'-> sfx':>7s}  completion with the suffix")
summary = {}
for w, res in runs.items():
    rows = res["results"]
    for i, r in enumerate(rows):
        print(f"{w:6g} {i:2d} {r['steps']:5d} {r['initial']['ce']:9.3f} {r['ce']:8.3f} "
              f"{r['mean_abs_cos_before']:10.3f} {r['mean_abs_cos_after']:7.3f}  "
              f"{'REFUSES ' if r['refused'] else 'complies'} {r['completion'][:60]!r}")
    n, mean = len(rows), lambda k: sum(r[k] for r in rows) / len(rows)
    s = summary[w] = {**res["summary"], "ce_fell": sum(r["ce"] < r["initial"]["ce"] for r in rows),
                      "ce_before": sum(r["initial"]["ce"] for r in rows) / n, "ce_after": mean("ce"),
                      "cos_fell": sum(r["mean_abs_cos_after"] < r["mean_abs_cos_before"] for r in rows),
                      "seconds": seconds.get(w)}
    took = f"{s['seconds']:.0f} s" if s["seconds"] is not None else "an earlier run"
    print(f"weight {w:g}: CE fell on {s['ce_fell']}/{n} ({s['ce_before']:.3f} -> {s['ce_after']:.3f}); mean |cos| "
          f"fell on {s['cos_fell']}/{n} ({s['mean_abs_cos_before']:.3f} -> {s['mean_abs_cos_after']:.3f}); target "
          f"greedy on {s['target_is_greedy']}/{n}; {n - s['refused']}/{n} no longer refuse; gcg_repind.py {took}")
print(f"total {time.time() - t0:.0f} s")
C.save_json(os.path.join(args.out, "bench_gcg_qwen.json"), {"args": vars(args), "prompts": prompts, "summary": summary})
print(f"wrote {args.out}/bench_gcg_qwen.json")
