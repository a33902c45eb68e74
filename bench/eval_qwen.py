"""Real-model check of evaluate.py (not part of CI): asr, induce, kl and cosine for DIM and RDO on Qwen.

Qwen2.5-Coder-0.5B-Instruct, the DIM direction of bench/dim_qwen.py and the RDO direction of bench/rdo_qwen.py,
reduced budget: 32 harmful and 32 harmless held-out prompts (the SALAD-Bench / Alpaca validation splits after
the 32 that dim.py / rdo.py validated on: JailbreakBench is not available offline), 64 new tokens, greedy,
substring judge. Runs evaluate.py's modes one after the other and prints the tables from their JSON files:
  asr      refusal rate / ASR: baseline, ablation, subtraction (alpha = |DIM| at layer 16)
  induce   harmless refusal rate and refusal score with alpha r_hat added (alpha = |DIM|), and a sweep of
           the refusal score over --alphas without generation (out/sweep/eval_induce.json, Figure 20)
  kl       harmless KL at the last position and CE of the model's own answers under ablation
  cosine   per-layer cosine with DIM and RDO, clean and with either ablated (Figure 6)

  python bench/eval_qwen.py [--n 32] [--max-new-tokens 64] [--out runs/bench/eval_qwen]
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import evaluate  # noqa: E402
from evalkit import DIM, QWEN, held_out  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=QWEN)
p.add_argument("--dim", default=DIM)
p.add_argument("--rdo", default="runs/bench/rdo_qwen/rdo.safetensors")
p.add_argument("--out", default="runs/bench/eval_qwen")
p.add_argument("--n", type=int, default=32)
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--alphas", default="0 2 4 6.8355 8 10 12", help="induce sweep, refusal scores only (|DIM| = 6.8355)")
p.add_argument("--modes", default="asr induce kl cosine")
p.add_argument("--print-only", action="store_true", help="print the tables of the JSON files already in --out")
args = p.parse_args()
for path in (args.model, args.dim, args.rdo):
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run ../shared/scripts/get_test_models.py, bench/dim_qwen.py and bench/rdo_qwen.py first")

harm, safe = held_out(args.n)
os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
files = {k: os.path.join(args.out, "data", f"{k}.json") for k in ("harmful", "harmless")}
for k, v in (("harmful", harm), ("harmless", safe)):
    C.save_json(files[k], v)
common = ["--model", args.model, "--direction", args.dim, args.rdo, "--harmful", files["harmful"], "--harmless",
          files["harmless"], "--n-val", str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--out", args.out, "--overwrite"]
seconds = {}
for mode in [] if args.print_only else args.modes.split():
    t0 = time.time()
    evaluate.main([mode] + common)
    if mode == "induce":  # the alpha sweep by refusal score alone: one scoring pass per alpha, no generation
        evaluate.main([mode] + common[:-2] + [os.path.join(args.out, "sweep"), "--overwrite", "--max-new-tokens", "0",
                                              "--alphas", *args.alphas.split()])
    seconds[mode] = time.time() - t0

dm, rm = C.load_result(args.dim)[1], C.load_result(args.rdo)[1]
print(f"\nQwen2.5-Coder-0.5B-Instruct; DIM (layer {dm['layer']}, alpha {dm['alpha']:.2f}) and RDO (layer {rm['layer']}, alpha "
      f"{rm['alpha']:.2f}, {args.rdo}); {args.n} harmful + "
      f"{args.n} harmless held-out SALAD-Bench / Alpaca prompts; greedy, {args.max_new_tokens} new tokens, substring judge")
for mode in args.modes.split() + ["sweep"] * ("induce" in args.modes):
    path = os.path.join(args.out, "sweep", "eval_induce.json") if mode == "sweep" else os.path.join(args.out, f"eval_{mode}.json")
    res = json.load(open(path))
    print(f"\n{mode} ({res['seconds']:.0f} s; plot {res['png']}):\n{evaluate.table(res['table'])}")
print(f"\ntotal {sum(seconds.values()):.0f} s" if seconds else "")
