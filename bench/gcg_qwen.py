"""Real-model check of gcg_repind.py (not part of CI): does GCG with the RepInd term lower the CE of the target
and the direction's cosine at the last token, and how many prompts stop being refused?

Qwen2.5-Coder-0.5B-Instruct, the DIM direction from bench/dim_qwen.py (layer 16) standing in for RepInd-1.
Prompts: the first --n held-out harmful validation prompts (evalkit.held_out) that the model refuses without a
suffix (greedy, 64 tokens, substring judge). One suffix per prompt, at a reduced budget (--steps, --search-width,
--topk; the paper/nanoGCG: 250, 512, 256), once per --weights value (0 = plain GCG, for comparison).
Prints per prompt: CE of the target with the 'x x x' suffix -> the found suffix, mean-over-layers cosine and the
cosine at the DIM layer without a suffix -> with it, and whether the greedy completion still refuses.

  python bench/gcg_qwen.py [--n 5] [--steps 20] [--search-width 64] [--topk 64] [--weights 1.0]
  python bench/gcg_qwen.py --weights 1.0 0      # plain GCG (weight 0) beside it
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import gcg_repind as G  # noqa: E402
from evalkit import DIM, QWEN, held_out  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--dim", default=DIM)
p.add_argument("--out", default="runs/bench/gcg_qwen")
p.add_argument("--n", type=int, default=5)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--search-width", type=int, default=64)
p.add_argument("--topk", type=int, default=64)
p.add_argument("--weights", type=float, nargs="+", default=[1.0], help="RepInd weights to run (0 = plain GCG)")
p.add_argument("--pool", type=int, default=24, help="held-out prompts to look for refused ones among")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
if not os.path.isfile(args.dim):
    sys.exit(f"{args.dim} not found: run bench/dim_qwen.py first")
os.makedirs(args.out, exist_ok=True)
t0 = time.time()

prompts_path = os.path.join(args.out, "prompts.json")
if not os.path.isfile(prompts_path):
    model, tok = C.load_model(QWEN)
    pool = held_out(args.pool)[0]
    refused = [x for x, c in zip(pool, C.generate(model, tok, pool, 64, desc="no suffix")) if C.is_refusal(c)]
    if len(refused) < args.n:
        sys.exit(f"only {len(refused)} of {args.pool} prompts are refused: raise --pool")
    C.save_json(prompts_path, refused[:args.n])
    del model
prompts = json.load(open(prompts_path))[:args.n]
print(f"{len(prompts)} refused held-out prompts in {prompts_path}")

runs = {}
for w in args.weights:
    out = os.path.join(args.out, f"w{w:g}")
    resume = os.path.isfile(os.path.join(out, "gcg_checkpoint.pt"))
    if not os.path.isfile(os.path.join(out, "gcg.json")) or resume:
        G.main(["--model", QWEN, "--harmful", prompts_path, "--n", str(args.n), "--direction", args.dim,
                "--repind-weight", str(w), "--steps", str(args.steps), "--search-width", str(args.search_width),
                "--topk", str(args.topk), "--batch-size", str(args.search_width), "--seed", str(args.seed),
                "--out", out] + (["--resume"] if resume else ["--overwrite"]))
    runs[w] = json.load(open(os.path.join(out, "gcg.json")))

layer = json.load(open(os.path.splitext(args.dim)[0] + ".json"))["layer"]
print(f"\nGCG on Qwen2.5-Coder-0.5B-Instruct, {args.n} refused held-out harmful prompts; {args.steps} steps, search width "
      f"{args.search_width}, top-k {args.topk}, suffix 20; direction: DIM (layer {layer}); cosine at the last prompt token")
print(f"{'w':>4s} {'#':>2s} {'steps':>5s} {'CE x-init':>9s} {'CE found':>8s} {'cos mean: none':>14s} {'-> sfx':>7s} "
      f"{'cos L' + str(layer) + ': none':>14s} {'-> sfx':>7s}  completion with the suffix")
summary = {}
for w, res in runs.items():
    rows = res["results"]
    for i, r in enumerate(rows):
        print(f"{w:4g} {i:2d} {r['steps']:5d} {r['initial']['ce']:9.3f} {r['ce']:8.3f} {r['cos_mean_before']:+14.3f} "
              f"{r['cos_mean_after']:+7.3f} {r['cos_before'][layer]:+14.3f} {r['cos_after'][layer]:+7.3f}  "
              f"{'REFUSES ' if r['refused'] else 'complies'} {r['completion'][:60]!r}")
    n = len(rows)
    summary[w] = {"ce_fell": sum(r["ce"] < r["initial"]["ce"] for r in rows),
                  "cos_mean_fell": sum(r["cos_mean_after"] < r["cos_mean_before"] for r in rows),
                  "cos_layer_fell": sum(r["cos_after"][layer] < r["cos_before"][layer] for r in rows),
                  "no_longer_refuse": sum(not r["refused"] for r in rows), "n": n,
                  "mean_cos_before": sum(r["cos_mean_before"] for r in rows) / n,
                  "mean_cos_after": sum(r["cos_mean_after"] for r in rows) / n, "seconds": res["seconds"]}
    s = summary[w]
    print(f"w={w:g}: CE fell on {s['ce_fell']}/{n}; mean cosine fell on {s['cos_mean_fell']}/{n} "
          f"({s['mean_cos_before']:+.3f} -> {s['mean_cos_after']:+.3f}), at layer {layer} on {s['cos_layer_fell']}/{n}; "
          f"{s['no_longer_refuse']}/{n} no longer refuse; gcg_repind.py {s['seconds']:.0f} s")
print(f"total {time.time() - t0:.0f} s")
C.save_json(os.path.join(args.out, "bench_gcg_qwen.json"), {"args": vars(args), "prompts": prompts, "summary": summary})
print(f"wrote {args.out}/bench_gcg_qwen.json")
