"""Real-model check of evaluate.py (not part of CI): asr, induce, kl and cosine for DIM and RDO on Qwen.

Qwen2.5-Coder-0.5B-Instruct, the DIM direction of bench/dim_qwen.py and the RDO direction of bench/rdo_qwen.py,
reduced budget: 32 harmful and 32 harmless held-out prompts (the SALAD-Bench / Alpaca validation splits after
the 32 that dim.py / rdo.py validated on: JailbreakBench is not available offline; --n-harmless takes more of
Alpaca's, up to 96 harmful remain), 64 new tokens, greedy, substring judge. Runs evaluate.py's modes one after the
other and prints the tables from their JSON files, then each RDO direction against DIM prompt by prompt (paired):
  asr      refusal rate / ASR: baseline, ablation, subtraction (alpha = |DIM| at layer 16)
  induce   harmless refusal rate and refusal score with alpha r_hat added (alpha = |DIM|), and a sweep of
           the refusal score over --alphas without generation (out/sweep/eval_induce.json, Figure 20)
  kl       harmless KL at the last position and CE of the model's own answers under ablation
  cosine   per-layer cosine with DIM and RDO, clean and with either ablated (Figure 6)

  python bench/eval_qwen.py [--n 32] [--n-harmless N] [--rdo FILE ...] [--max-new-tokens 64] [--out runs/bench/eval_qwen]
  python bench/eval_qwen.py --modes induce --alphas "" --n-harmless 256 --rdo A/rdo.safetensors B/rdo.safetensors --out X
"""
import argparse, json, math, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import evaluate  # noqa: E402
from evalkit import DIM, QWEN, held_out  # noqa: E402


def table(rows):
    """A markdown table of rows (dicts)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else "" if v is None else str(v)
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])


def rows(res, mode):
    """One evaluate.py result file's numbers as table rows."""
    if mode == "cosine":
        return [{"condition": c, "cosine with": k, "mean over layers": sum(v) / len(v), "max": max(v)}
                for c, cs in res["results"].items() for k, v in cs.items()]
    return [{"result": k, **{x: y for x, y in r.items() if isinstance(y, float)}}
            for k, rs in res["results"].items() for r in (rs if isinstance(rs, list) else [rs])]


def sign_test(b, c):
    """Two-sided exact sign test (McNemar's) on b and c discordant pairs: how likely a split at least this uneven is
    if either direction is as likely as the other to win a prompt."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def paired(res, mode):
    """Each RDO direction against DIM (the first --direction) on the same prompts: how many each makes the model
    refuse, on how many both do, and on how many only one does, with the sign test on those."""
    pick = lambda label: res["results"][label][0] if mode == "induce" else res["results"][f"{label} ablation"]
    dim, *rdos = res["directions"]  # as evaluate.py labelled and saved them, in --direction's order
    d, rows = pick(dim["label"])["refused"], []
    for run in rdos:
        r = pick(run["label"])["refused"]
        b, c = sum(x and not y for x, y in zip(d, r)), sum(y and not x for x, y in zip(d, r))
        rows.append({"RDO": os.path.basename(os.path.dirname(os.path.abspath(run["path"]))), "n": len(r),
                     "DIM refusal": sum(d) / len(d), "RDO refusal": sum(r) / len(r),
                     "both": sum(x and y for x, y in zip(d, r)), "DIM only": b, "RDO only": c, "sign test p": sign_test(b, c)})
    return table(rows)


p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=QWEN)
p.add_argument("--dim", default=DIM)
p.add_argument("--rdo", nargs="+", default=["runs/bench/rdo_qwen/rdo.safetensors"], help="one or more rdo.py results")
p.add_argument("--out", default="runs/bench/eval_qwen")
p.add_argument("--n", type=int, default=32, help="held-out prompts per set (harmful: at most 96 remain)")
p.add_argument("--n-harmless", type=int, default=None, help="harmless prompts (default: --n)")
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--alphas", default="0 2 4 6.8355 8 10 12", help="induce sweep, refusal scores only (|DIM| = 6.8355); \"\": no sweep")
p.add_argument("--modes", default="asr induce kl cosine")
p.add_argument("--print-only", action="store_true", help="print the tables of the JSON files already in --out")
args = p.parse_args()
for path in (args.model, args.dim, *args.rdo):
    if not os.path.exists(path):
        sys.exit(f"{path} not found: run ../shared/scripts/get_test_models.py, bench/dim_qwen.py and bench/rdo_qwen.py first")

harm, safe = held_out(args.n)[0], held_out(args.n_harmless or args.n)[1]  # the first N are the same prompts for any N
os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
files = {k: os.path.join(args.out, "data", f"{k}.json") for k in ("harmful", "harmless")}
for k, v in (("harmful", harm), ("harmless", safe)):
    C.save_json(files[k], v)
common = ["--model", args.model, "--direction", args.dim, *args.rdo, "--harmful", files["harmful"], "--harmless",
          files["harmless"], "--n-val", str(max(len(harm), len(safe))), "--max-new-tokens", str(args.max_new_tokens),
          "--out", args.out, "--overwrite"]
seconds = {}
for mode in [] if args.print_only else args.modes.split():
    t0 = time.time()
    evaluate.main([mode] + common)
    if mode == "induce" and args.alphas.split():  # the alpha sweep by refusal score alone: one scoring pass per alpha, no generation
        evaluate.main([mode] + common[:-2] + [os.path.join(args.out, "sweep"), "--overwrite", "--max-new-tokens", "0",
                                              "--alphas", *args.alphas.split()])
    seconds[mode] = time.time() - t0

dm = C.load_result(args.dim)[1]
print(f"\nQwen2.5-Coder-0.5B-Instruct; DIM (layer {dm['layer']}, alpha {dm['alpha']:.2f}) and RDO ({', '.join(args.rdo)}); "
      f"{len(harm)} harmful + {len(safe)} harmless held-out SALAD-Bench / Alpaca prompts; greedy, {args.max_new_tokens} "
      "new tokens, substring judge")
for mode in args.modes.split() + ["sweep"] * ("induce" in args.modes and bool(args.alphas.split())):
    path = os.path.join(args.out, "sweep", "eval_induce.json") if mode == "sweep" else os.path.join(args.out, f"eval_{mode}.json")
    res = json.load(open(path))
    print(f"\n{mode} ({seconds.get(mode, float('nan')):.0f} s; plot {res.get('png')}):\n{table(rows(res, mode))}")
    if mode == "asr" or mode == "induce" and args.max_new_tokens:  # (induce without generation has no refusals)
        what = "ablated harmful" if mode == "asr" else "added harmless"
        print(f"\n{mode}, paired ({what} prompts refused):\n{paired(res, mode)}")
print(f"\ntotal {sum(seconds.values()):.0f} s" if seconds else "")
