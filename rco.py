"""Refusal Cone Optimization: Algorithm 2 of the paper (Section 5, Appendix A and E).

A k-dimensional concept cone is the set {sum_i lambda_i b_i, lambda_i >= 0} spanned by an orthonormal basis
B = [b_1 .. b_k]. RCO trains B so that every direction in the cone has the refusal properties of Algorithm 1:
  L_sample = mean RDO loss of directions sampled uniformly from the cone   (Algorithm 2, line 4)
  L_basis  = mean RDO loss of the basis vectors, the cone's edges          (line 5: they degrade first)
  L = L_sample + L_basis, AdamW as in rdo.py, gradient tangent to the sphere, Gram-Schmidt after every step.
Samples are uniform on the cone's part of the unit sphere: s = |N(0, I_k)| / norm, r = s B. (Normalising a
random convex combination instead would favour the basis vectors, as the paper warns.) The paper draws 16
samples per accumulation step of one example, 256 per batch of 16: here `--samples` per example, and every
(example, direction) pair is one row of a batch, each row ablating its own direction.
Cones grow one dimension at a time: the k-cone starts from the chosen (k-1)-basis plus one random vector.

Usage:
  python rco.py --model google/gemma-2-2b-it --layer 12 --max-dim 4        # computes DIM at layer 12 itself
  python rco.py --model Qwen/Qwen2.5-1.5B-Instruct --dim runs/Qwen2.5-1.5B-Instruct/dim/dim.safetensors
  python rco.py ... --resume                                              # after Ctrl-C or a crash
Each step costs about (samples + k) RDO steps. Writes DIR/k<k>/rco.safetensors (tensor `basis`, k x d,
orthonormal rows) and DIR/k<k>/rco.json (loss history, chosen step, selection scores, and the bypass / induce
scores of --eval-samples directions sampled from the cone beside the basis vectors' own) for every k, and
DIR/rco.png: their distributions over k (Figure 3).
"""
import math, os, shutil, time

import torch
from tqdm.auto import tqdm

import common as C
import dim
import rdo


def parse_args(argv=None):
    p = rdo.training_parser(__doc__, "rco")
    a = p.add_argument
    a("--min-dim", type=int, default=2, help="smallest cone dimension k (1 = an RDO direction)")
    a("--max-dim", type=int, default=3, help="largest cone dimension (the paper goes up to 5)")
    a("--samples", type=int, default=16, help="cone samples per training example and step (paper: 16)")
    a("--eval-samples", type=int, default=256, help="sampled directions scored for the sidecar and plot (paper: 256)")
    a("--select-samples", type=int, default=8, help="selection fallback: samples per candidate basis")
    a("--init", default=None, metavar="FILE", help="start the first cone from these directions (e.g. rdo.safetensors) "
                                                   "plus random vectors, instead of from random vectors only")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the cone

def sample_coefficients(k, n, generator=None):
    """n points uniform on {s in R^k: s >= 0, |s| = 1}: the standard normal is rotation invariant, so |N(0, I)|
    normalised is uniform on the sphere folded into the positive orthant."""
    s = torch.randn(n, k, generator=generator).abs()
    return s / s.norm(dim=1, keepdim=True)


def gram_schmidt(B):
    """Orthonormal rows, in order: b_1 keeps its direction, b_2 loses its b_1 component, and so on (a QR would be
    free to flip signs, turning the cone inside out)."""
    rows = []
    for b in B:
        for q in rows:
            b = b - (b @ q) * q
        rows.append(b / b.norm())
    return torch.stack(rows)


def cone_loss_and_grad(S, B, batch, n_samples, generator):
    """Lines 4-6 of Algorithm 2 on one batch, leaving dL/dB in B.grad. Returns L and its parts as floats."""
    n, k = len(batch), B.shape[0]
    args = (S.model, S.tok)
    rest = (S.alpha, S.layer, S.lambdas, S.micro_batch)
    # line 4: directions sampled from the cone, n_samples per example. Each is a leaf of its own, so that every
    # micro-batch can run backward; the chain rule through r = s B is applied once at the end.
    s = sample_coefficients(k, n * n_samples, generator).to(B)
    R = (s @ B).detach().requires_grad_(True)
    sample = rdo.loss_and_grad(*args, R, [x for x in batch for _ in range(n_samples)], *rest)
    grad = s.T @ R.grad
    # line 5: the basis vectors themselves, each with every example
    E = B.detach().repeat(n, 1).requires_grad_(True)
    basis = rdo.loss_and_grad(*args, E, [x for x in batch for _ in range(k)], *rest)
    B.grad = grad + E.grad.view(n, k, -1).sum(0)
    return {"loss": sample["loss"] + basis["loss"], "sample": sample["loss"], "basis": basis["loss"],
            **{f"sample_{key}": sample[key] for key in S.lambdas}, **{f"basis_{key}": basis[key] for key in S.lambdas}}


# ----------------------------------------------------------------------------- selection and evaluation

def bypass_scores(S, dirs, refusal_ids, args):
    """Mean refusal score on the harmful validation prompts with each direction ablated (lower: better attack)."""
    out = []
    for r in dirs:
        with C.directional_ablation(S.model, r):
            out.append(C.refusal_scores(C.last_logits(S.model, S.tok, S.harm_val, args.batch_size), refusal_ids).mean().item())
    return out


def select_basis(S, iterates, args):
    """Among the last --select-last of a run's iterates (step i's basis at index i): a basis whose vectors all pass
    the DIM filters (lowest mean bypass score), else the basis whose cone samples have the lowest mean bypass score
    (the same samples for every candidate)."""
    refusal_ids = C.refusal_token_ids(S.tok)
    base_safe = C.last_logits(S.model, S.tok, S.safe_val, args.batch_size)
    steps = list(range(len(iterates)))[-args.select_last:]
    iterates = [iterates[i].to(S.device) for i in steps]
    scored = []
    for step, B in tqdm(list(zip(steps, iterates)), desc="selection"):
        vecs = [dim.score_direction(S.model, S.tok, S.alpha * b, S.layer, S.harm_val, S.safe_val, base_safe, refusal_ids,
                                    args.batch_size) for b in B]
        for v in vecs:
            v["discarded"] = dim.discard_reasons(v, args.kl_threshold, args.induce_threshold)
        scored.append({"step": step, "vectors": vecs, "bypass": sum(v["bypass"] for v in vecs) / len(vecs),
                       "passes": not any(v["discarded"] for v in vecs)})
    kept = [s for s in scored if s["passes"] and math.isfinite(s["bypass"])]
    if kept:
        return min(kept, key=lambda s: s["bypass"]), scored
    print("no iterate has every basis vector passing the filters; choosing by the mean bypass score of cone samples")
    coeffs = sample_coefficients(len(iterates[0]), args.select_samples, torch.Generator().manual_seed(args.seed))
    for s, B in zip(scored, iterates):
        s["sample_bypass"] = sum(bypass_scores(S, coeffs.to(B) @ B, refusal_ids, args)) / len(coeffs)
    finite = [s for s in scored if math.isfinite(s["sample_bypass"])]
    if not finite:
        raise C.RefusalError("every iterate scored NaN in the selection: the training diverged; lower --lr")
    return min(finite, key=lambda s: s["sample_bypass"]), scored


def quartiles(xs):
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    return dict(zip(("min", "q1", "median", "q3", "max"), q.tolist()))


def evaluate_cone(S, B, args):
    """Bypass score (ablation, harmful val) and induce score (alpha r_hat added, harmless val) of eval-samples
    directions drawn from the cone with a fixed seed, and of the basis vectors; distributions as quartiles."""
    refusal_ids = C.refusal_token_ids(S.tok)
    coeffs = sample_coefficients(B.shape[0], args.eval_samples, torch.Generator().manual_seed(args.seed + 1))
    out = {}
    for name, dirs in (("samples", coeffs.to(B) @ B), ("basis", B)):
        induce = []
        for r in tqdm(dirs, desc=f"scoring {name}", leave=False):
            with C.activation_addition(S.model, S.alpha * r, S.layer):
                logits = C.last_logits(S.model, S.tok, S.safe_val, args.batch_size)
            induce.append(C.refusal_scores(logits, refusal_ids).mean().item())
        out[name] = {"bypass": bypass_scores(S, dirs, refusal_ids, args), "induce": induce}
        out[name]["bypass_quartiles"], out[name]["induce_quartiles"] = quartiles(out[name]["bypass"]), quartiles(induce)
    return out


def plot_cones(results, path):
    """Figure 3: bypass and induce scores of the sampled directions per cone dimension (DIM-like scores)."""
    titles = {"bypass": "refusal score, direction ablated (harmful)", "induce": "refusal score, direction added (harmless)"}
    return C.plot_panels(path, [("box", {str(k): results[k]["samples"][key] for k in sorted(results)},
                                 dict(xlabel="cone dimension k", title=title)) for key, title in titles.items()])


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if not 1 <= args.min_dim <= args.max_dim:
        raise C.RefusalError(f"need 1 <= --min-dim <= --max-dim, got {args.min_dim} and {args.max_dim}")
    C.check_counts(args, "samples", "eval_samples", "select_samples")
    args.out = args.out or C.model_dir(args.model, "rco")
    # any cone already in the folder, not only those of this range: rco.png would be redrawn without them
    done = sorted(int(f[1:]) for f in (os.listdir(args.out) if os.path.isdir(args.out) else [])
                  if f[:1] == "k" and f[1:].isdigit() and os.path.isfile(os.path.join(args.out, f, "rco.safetensors")))
    if done and not (args.resume or args.overwrite):
        unfinished = os.path.isfile(rdo.checkpoint_path(args.out, "rco"))  # then --overwrite would lose it
        raise C.RefusalError(f"'{args.out}' already holds cones of dimension {done}" + (
            ", and an unfinished run: pass --resume to continue it" if unfinished else "") +
            ": pass --overwrite to start over, or --out elsewhere")
    S = rdo.setup(args, "rco")
    device, d = S.device, C.hidden_size(S.model)
    print(f"RCO at layer {S.layer}, alpha {S.alpha:.2f}, cones of dimension {args.min_dim}..{args.max_dim}, {S.n} training "
          f"pairs, {args.samples} samples per example")

    init = None
    if args.init:  # e.g. an RDO direction: the 1-cone that Algorithm 2 would otherwise have to find again
        rows = C.at_least_fp32(C.load_direction(args.init, S.model)[0].reshape(-1, d)).cpu()
        if len(rows) > args.min_dim:
            raise C.RefusalError(f"--init holds {len(rows)} directions, more than --min-dim {args.min_dim}")
        if torch.linalg.matrix_rank(rows) < len(rows):
            raise C.RefusalError(f"--init {args.init}: its directions are linearly dependent; pass independent ones")
        init = gram_schmidt(rows)
    run_key = {**S.run_key, **{f: getattr(args, f) for f in ("samples", "min_dim", "max_dim", "init", "select_samples",
                                                              *rdo.SELECTION_FLAGS)}}
    ck = {"k": args.min_dim, "prev": init}
    if args.resume:
        ck = C.load_checkpoint(S.ckpt_path, run_key)
        print(f"resumed at k = {ck['k']}, step {ck['state']['step']} from {S.ckpt_path}")
    results = {}
    for k in range(args.min_dim, args.max_dim + 1):
        folder = os.path.join(args.out, f"k{k}")
        if k < ck["k"]:  # finished before the interruption
            results[k] = C.load_result(os.path.join(folder, "rco.safetensors"))[1]["evaluation"]
            continue
        # Algorithm 2, line 1: initialise B randomly; a k-cone grows from the chosen (k-1)-cone (or from --init)
        g = torch.Generator().manual_seed(args.seed + k)
        fresh = torch.randn(k - (0 if ck["prev"] is None else len(ck["prev"])), d, generator=g)
        B = gram_schmidt(fresh if ck["prev"] is None else torch.cat([ck["prev"], fresh])).to(device).requires_grad_(True)
        opt = rdo.make_optimizer(B, args)
        order = rdo.batch_order(S.n, args.effective_batch, args.epochs, g)
        state = rdo.new_state()
        if ck.get("state") is not None and ck["k"] == k:  # resuming inside this k
            with torch.no_grad():
                B.copy_(ck["B"].to(device))
            opt.load_state_dict(ck["opt"])
            state, order = ck["state"], ck["order"]
            g.set_state(ck["rng"])  # the cone samples continue where they stopped
        bar = tqdm(total=S.total, initial=state["step"], desc=f"rco k={k}")
        while state["step"] < S.total and not state["done"]:  # line 2: while not converged
            s = state["step"]
            idx = order[s * args.effective_batch:(s + 1) * args.effective_batch].tolist()  # line 3: sample a batch
            opt.zero_grad()
            sums = cone_loss_and_grad(S, B, rdo.training_batch(S, idx), args.samples, g)  # lines 4-6
            rdo.check_finite(sums["loss"], B.grad, f"k = {k}, step {s}", S.ckpt_path)
            with torch.no_grad():
                sums["grad_norm"] = rdo.sphere_step(opt, B, args.max_grad_norm)  # line 7, row by row
                B.copy_(gram_schmidt(B))  # line 8: back to an orthonormal basis
            rdo.record_step(opt, state, sums, B, args)
            ck = {"k": k, "prev": ck["prev"], "B": B.detach().cpu(), "opt": opt.state_dict(), "state": state, "order": order,
                  "rng": g.get_state(), "run": run_key}
            C.atomic_write(S.ckpt_path, lambda tmp: torch.save(ck, tmp))  # Ctrl-C now loses at most this step
            bar.update(1)
            tqdm.write(f"k={k} step {s}: loss {sums['loss']:.4f} (samples {sums['sample']:.4f}, basis {sums['basis']:.4f}), "
                       f"lr {opt.param_groups[0]['lr']:.0e}" + (", plateau: stop" if state["done"] else ""))
        bar.close()

        chosen, scored = select_basis(S, state["iterates"], args)
        basis = state["iterates"][chosen["step"]]
        results[k] = evaluate_cone(S, basis.to(device), args)
        q = results[k]["samples"]["bypass_quartiles"]
        meta = {"model": args.model, "layer": S.layer, "alpha": S.alpha, "k": k, **C.provenance(args, S.model), "dim": args.dim,
                "dim_layer": S.dim_layer, "chosen_step": chosen["step"], "chosen_scores": chosen, "selection": scored,
                "history": state["history"], "evaluation": results[k], "max_abs_offdiag_gram": (basis @ basis.T -
                torch.eye(k)).abs().max().item(), "data": {"train_pairs": S.n, "harmful_val": len(S.harm_val),
                "harmless_val": len(S.safe_val)}, "seconds": round(time.time() - t0, 1)}
        path = C.save_result(folder, "rco", {"basis": basis}, meta)
        print(f"k={k}: chose step {chosen['step']}; sampled directions' bypass score median {q['median']:.3f} "
              f"(worst {q['max']:.3f}); wrote {path}")
        ck = {"k": k + 1, "prev": basis, "state": None, "run": run_key}
        C.atomic_write(S.ckpt_path, lambda tmp: torch.save(ck, tmp))
    # cones outside this range come from the run that --overwrite replaced: kept until now (the new run could have
    # failed), removed now so that the folder and rco.png hold one run
    stale = [k for k in done if not args.min_dim <= k <= args.max_dim]
    for k in stale:
        shutil.rmtree(os.path.join(args.out, f"k{k}"))
    if stale:
        print(f"removed the replaced run's cones of dimension {stale} from {args.out}")
    plot_cones(results, os.path.join(args.out, "rco.png"))
    os.remove(S.ckpt_path)
    print(f"wrote {args.out}/k*/rco.safetensors and rco.json, {args.out}/rco.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
