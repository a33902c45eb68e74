"""Real-model check of rco.py (not part of CI): do the directions sampled from a refusal cone mediate refusal?

Trains cones of dimension 2 and 3 on Qwen2.5-Coder-0.5B-Instruct at the DIM layer with a reduced budget
(default: the 2-cone starts from bench/rdo_qwen.py's RDO direction plus a random vector, 6 optimizer steps of 8
pairs per cone, 2 cone samples per pair, selection over the last 3 iterates), then
samples --n-dirs directions from each cone (fixed seed) and, for each, generates on held-out prompts
(--max-new-tokens, substring judge):
  harmful refusal rate with the direction ablated       (median and worst sample; should sit well below baseline)
  harmless refusal rate with alpha * r_hat added         (median and worst sample)
beside the DIM direction and the unmodified model. Needs bench/dim_qwen.py's and bench/rdo_qwen.py's results first.

  python bench/rco_qwen.py [--max-steps 6] [--n-dirs 64] [--reuse]
"""
import argparse, os, sys, time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rco  # noqa: E402
from evalkit import DIM, QWEN, held_out, kl_last, refusal_rate, split_args  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--dim", default=DIM)
p.add_argument("--out", default="runs/bench/rco_qwen")
p.add_argument("--init", default="runs/bench/rdo_qwen/rdo.safetensors", help="'' to start from random vectors")
p.add_argument("--max-steps", type=int, default=6)
p.add_argument("--effective-batch", type=int, default=8)
p.add_argument("--samples", type=int, default=2)
p.add_argument("--n-dirs", type=int, default=64, help="sampled directions per cone for the generation check")
p.add_argument("--n-eval", type=int, default=32, help="held-out prompts per class")
p.add_argument("--max-new-tokens", type=int, default=16, help="refusals show in the first tokens")
p.add_argument("--reuse", action="store_true", help="evaluate existing rco.py results in --out")
args = p.parse_args()
if not os.path.isfile(args.dim):
    sys.exit(f"{args.dim} not found: run bench/dim_qwen.py first")

t0 = time.time()
if not args.reuse:  # 256 pairs: the targets are those bench/rdo_qwen.py cached; --max-steps 6 uses 6 x 8 of them
    rco.main(["--model", QWEN, "--dim", args.dim, *split_args(), "--n-train", "256",
              "--n-val", "32", "--min-dim", "2", "--max-dim", "3", "--max-steps", str(args.max_steps),
              "--effective-batch", str(args.effective_batch), "--samples", str(args.samples), "--select-last", "3",
              "--eval-samples", "16", "--select-samples", "4", "--out", args.out, "--overwrite"]
             + (["--init", args.init] if args.init else []))
t_train = time.time() - t0

model, tok = C.load_model(QWEN)
harm, safe = held_out(args.n_eval)
dim_vec, dim_meta = C.load_direction(args.dim, model)
layer, alpha = dim_meta["layer"], dim_vec.norm().item()
gen = lambda prompts: refusal_rate(C.generate(model, tok, prompts, args.max_new_tokens, desc=None))


def rates(r):
    with C.directional_ablation(model, r):
        abl = gen(harm)
    with C.activation_addition(model, alpha * r / r.norm(), layer):
        add = gen(safe)
    return abl, add


t1 = time.time()
rows = {"baseline": (gen(harm), gen(safe)), "DIM": rates(dim_vec)}
cones = {}
for k in (2, 3):
    B, meta = C.load_direction(os.path.join(args.out, f"k{k}", "rco.safetensors"), model)
    coeffs = C.sample_cone(k, args.n_dirs, torch.Generator().manual_seed(0))
    samples = [rates(r) for r in tqdm(coeffs @ B, desc=f"k={k} samples")]
    cones[k] = {"ablated": [a for a, _ in samples], "added": [b for _, b in samples],
                "basis": [rates(b) for b in B], "chosen_step": meta["chosen_step"], "steps": len(meta["history"])}
t_eval = time.time() - t1

med = lambda xs: torch.tensor(xs).median().item()
print(f"\nQwen2.5-Coder-0.5B-Instruct, layer {layer}, alpha {alpha:.2f}; RCO from {args.init or 'random'}, {args.max_steps} steps x {args.effective_batch} pairs, "
      f"{args.samples} samples/pair; {args.n_dirs} sampled directions per cone; {args.n_eval} + {args.n_eval} held-out "
      f"prompts, {args.max_new_tokens} new tokens, substring judge")
print(f"{'':26s} {'baseline':>9s} {'DIM':>7s} " + " ".join(f"{f'k={k} median':>12s} {f'k={k} worst':>11s} {f'k={k} basis':>13s}" for k in cones))
for j, name in ((0, "harmful refusal (ablated)"), (1, "harmless refusal (added)")):
    key, worst = ("ablated", max) if j == 0 else ("added", min)
    cells = " ".join(f"{med(c[key]):12.1%} {worst(c[key]):11.1%} {'/'.join(f'{b[j]:.0%}' for b in c['basis']):>13s}" for c in cones.values())
    print(f"{name:26s} {rows['baseline'][j]:9.1%} {rows['DIM'][j]:7.1%} {cells}")
for k, c in cones.items():
    below = sum(a < rows["baseline"][0] / 2 for a in c["ablated"])
    print(f"k={k}: {below}/{len(c['ablated'])} sampled directions halve the harmful refusal rate; "
          f"trained {c['steps']} steps, chose step {c['chosen_step']}")
print(f"rco.py {t_train:.0f} s, evaluation {t_eval:.0f} s")
C.save_json(os.path.join(args.out, "bench_rco_qwen.json"), {"args": vars(args), "baseline": rows["baseline"], "dim": rows["DIM"],
                                                           "cones": cones, "seconds_train": t_train, "seconds_eval": t_eval})
print(f"wrote {args.out}/bench_rco_qwen.json")
