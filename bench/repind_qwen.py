"""Real-model check of repind.py (not part of CI): is a RepInd direction independent of DIM, where RDO-perp is not?

On Qwen2.5-Coder-0.5B-Instruct at the DIM layer, with a reduced budget (default: 128 training pairs, 8 steps =
one epoch, lambda_ret 1.0, lambda_repind 200, one candidate; selection over the last 4 iterates on 32 + 32 val prompts), then on 64 held-out harmful prompts:
  Figure 6     mean over layers of |cos(x, u) - cos(x~ with DIM ablated, u)| and |cos(x, DIM) - cos(x~ with u
               ablated, DIM)|, u = RepInd-1 or RDO-perp, last token, the first 90% of layers (the RepInd loss's
               layers) and all layers: RepInd should be well below RDO-perp
  refusal      harmful refusal rate with u ablated (64 new tokens, substring judge), vs the unmodified model
               and DIM (from bench/dim_qwen.py's result); harmless KL at the last position with u ablated
Needs bench/dim_qwen.py's result first (runs/bench/dim_qwen/selected/dim.safetensors). RDO-perp: by default
bench/rdo_qwen.py's RDO direction with its DIM component projected out (orthogonal to DIM, no training: the
machine this was written on is shared and slow); --train-perp trains one with rdo.py --orthogonal-to DIM.

  python bench/repind_qwen.py [--n-train 128] [--steps 8] [--train-perp] [--out runs/bench/repind_qwen]
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
import repind  # noqa: E402
from evalkit import DIM, QWEN, held_out, kl_last, refusal_rate, split_args  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--dim", default=DIM)
p.add_argument("--out", default="runs/bench/repind_qwen")
p.add_argument("--n-train", type=int, default=128)
p.add_argument("--steps", type=int, default=8, help="RepInd optimizer steps (one epoch of 128 pairs = 8)")
p.add_argument("--select-last", type=int, default=4)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--n-eval", type=int, default=64)
p.add_argument("--train-perp", action="store_true", help="train RDO-perp with rdo.py --orthogonal-to DIM (one epoch)")
p.add_argument("--perp-steps", type=int, default=None, help="with --train-perp: optimizer steps (default: one epoch)")
p.add_argument("--perp-from", default="runs/bench/rdo_qwen/rdo.safetensors",
               help="without --train-perp: RDO-perp = this RDO direction with its DIM component projected out")
p.add_argument("--skip-train", action="store_true", help="evaluate the existing results in --out")
args = p.parse_args()
if not os.path.isfile(args.dim):
    sys.exit(f"{args.dim} not found: run bench/dim_qwen.py first")
data = ["--model", QWEN, "--dim", args.dim, *split_args(), "--n-train", str(args.n_train),
        "--n-val", "32", "--select-last", str(args.select_last), "--seed", str(args.seed), "--overwrite"]
rep_file = os.path.join(args.out, "repind", "repind.safetensors")

t0 = time.time()
if not args.skip_train:
    repind.main(data + ["--n-directions", "1", "--candidates", "1", "--max-steps", str(args.steps), "--out",
                        os.path.dirname(rep_file)])
t_rep = time.time() - t0
if args.train_perp:  # RDO-perp trained by rdo.py: one epoch, the rdo.py defaults otherwise
    rdo.main(data + ["--orthogonal-to", args.dim, "--out", os.path.join(args.out, "rdo_perp")]
             + (["--max-steps", str(args.perp_steps)] if args.perp_steps else []))
t_perp = time.time() - t0 - t_rep

model, tok = C.load_model(QWEN)
dim_vec, dim_meta = C.load_direction(args.dim, model)
rep_vec, rep_meta = C.load_direction(rep_file, model)
if args.train_perp:
    perp_vec, perp_meta = C.load_direction(os.path.join(args.out, "rdo_perp", "rdo.safetensors"), model)
    perp_what = f"rdo.py --orthogonal-to DIM, {len(perp_meta['history'])} steps (chosen {perp_meta['chosen_step']})"
else:  # an RDO direction with its DIM component removed: orthogonal to DIM, and still a refusal direction
    rdo_vec, perp_meta = C.load_direction(args.perp_from, model)
    q = C.unit_basis(dim_vec)
    perp_vec = rdo_vec.float() - (rdo_vec.float() @ q.T) @ q
    perp_what = f"{args.perp_from} with DIM projected out"
harm, safe = held_out(args.n_eval)
t1 = time.time()
n_layers = int(0.9 * len(C.decoder_layers(model)))  # the RepInd loss's layers
curves = repind.figure6(model, tok, harm, dim_vec, {"RepInd-1": rep_vec[0], "RDO-perp": perp_vec}, 32)
change = lambda a, b, n=None: sum(abs(x - y) for x, y in zip(a[:n], b[:n])) / len(a[:n])
res = {}
base_safe = C.last_logits(model, tok, safe)
for name, u in (("RepInd-1", rep_vec[0]), ("RDO-perp", perp_vec)):
    c = curves[name]
    all_u, all_d = change(c["cos_u_clean"], c["cos_u_dim_ablated"]), change(c["cos_dim_clean"], c["cos_dim_u_ablated"])
    with C.directional_ablation(model, u):
        completions = C.generate(model, tok, harm, 64, desc=f"harmful, {name} ablated")
        kl = kl_last(base_safe, C.last_logits(model, tok, safe))
    res[name] = {"u_when_dim_ablated": change(c["cos_u_clean"], c["cos_u_dim_ablated"], n_layers),
                 "dim_when_u_ablated": change(c["cos_dim_clean"], c["cos_dim_u_ablated"], n_layers), "u_when_dim_ablated_all": all_u, "dim_when_u_ablated_all": all_d,
                 "harmful_refusal": refusal_rate(completions), "harmless_kl": kl,
                 "cos_with_dim": (u @ dim_vec / u.norm() / dim_vec.norm()).item(), "completions": completions}
prior = "runs/bench/dim_qwen/bench_dim_qwen.json"
prior = json.load(open(prior)) if os.path.isfile(prior) else {}
base = prior.get("baseline", {}).get("harmful_refusal")
if base is None:
    base = refusal_rate(C.generate(model, tok, harm, 64, desc="harmful"))
dim_rate = prior.get("dim", {}).get("harmful_refusal")
t_eval = time.time() - t1

h = rep_meta["directions"][0]["candidates"][0]
print(f"\nQwen2.5-Coder-0.5B-Instruct, DIM layer {dim_meta['layer']}; RDO-perp: {perp_what}; RepInd: {args.n_train} "
      f"training pairs, {len(h['history'])} steps (chosen "
      f"{h['chosen_step']}), 1 candidate; {args.n_eval} held-out harmful prompts, last token, 64 new tokens, substring judge")
print(f"{'':44s} {'RepInd-1':>9s} {'RDO-perp':>9s}")
rows = (("u_when_dim_ablated", f"mean |d cos(x,u)|, DIM ablated, layers 0-{n_layers - 1}"),
        ("dim_when_u_ablated", f"mean |d cos(x,DIM)|, u ablated, layers 0-{n_layers - 1}"),
        ("u_when_dim_ablated_all", "mean |d cos(x,u)|, DIM ablated, all layers"),
        ("dim_when_u_ablated_all", "mean |d cos(x,DIM)|, u ablated, all layers"),
        ("cos_with_dim", "cos(u, DIM)"), ("harmless_kl", "harmless KL, u ablated"))
for key, name in rows:
    print(f"{name:44s} {res['RepInd-1'][key]:9.4f} {res['RDO-perp'][key]:9.4f}")
print(f"{'harmful refusal, u ablated':44s} {res['RepInd-1']['harmful_refusal']:9.1%} {res['RDO-perp']['harmful_refusal']:9.1%}")
print(f"harmful refusal: unmodified model {base:.1%}" + (f", DIM ablated {dim_rate:.1%}" if dim_rate is not None else ""))
checks = {"RepInd changes the cosines less than RDO-perp, both ways":
          res["RepInd-1"]["u_when_dim_ablated"] < res["RDO-perp"]["u_when_dim_ablated"]
          and res["RepInd-1"]["dim_when_u_ablated"] < res["RDO-perp"]["dim_when_u_ablated"],
          "RepInd ablation lowers harmful refusal by 20+ points": res["RepInd-1"]["harmful_refusal"] <= base - 0.2}
for k, ok in checks.items():
    print(f"  {'yes' if ok else 'NO '}  {k}")
print(f"rdo.py (RDO-perp) {t_perp:.0f} s, repind.py {t_rep:.0f} s, evaluation {t_eval:.0f} s, total {time.time() - t0:.0f} s")
C.save_json(os.path.join(args.out, "bench_repind_qwen.json"), {"args": vars(args), "results": res, "baseline_harmful_refusal": base,
                                                               "dim_harmful_refusal": dim_rate, "curves": curves, "checks": checks,
                                                               "seconds_perp": t_perp, "seconds_repind": t_rep, "seconds_eval": t_eval})
print(f"wrote {args.out}/bench_repind_qwen.json")
