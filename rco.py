"""Refusal Cone Optimization: Algorithm 2 of the paper (Section 5, Appendices A.3 and E).

Trains an orthonormal basis B = [b_1 .. b_k] so that every direction of the cone {sum_i lambda_i b_i: lambda_i >= 0}
has the refusal properties of Algorithm 1 (rdo.py: COMPUTELOSS, its defaults and targets):
  1: initialise B randomly (the k-cone: the chosen (k-1)-basis plus one random vector)
  2: while not converged:
  3:   sample a batch of (p_harm, p_safe) with their targets
  4:   L_sample <- mean of COMPUTELOSS(r) over directions r ~ Sample(B), --samples per example (Appendix A: 16)
  5:   L_basis  <- mean of COMPUTELOSS(b_i) over the basis vectors (the cone's edges degrade first)
  6:   L <- L_sample + L_basis
  7:   B <- B - lr * (grad L projected onto the sphere's tangent at each b_i)     (AdamW)
  8:   B <- GramSchmidt(B)
  Sample(B): s ~ Unif{x in R^k: x >= 0, |x| = 1}, r = s B (normalised convex combinations would favour the edges)
The final basis: among the last 20, one whose every vector passes Arditi et al.'s filters (Appendix A.3).

Usage:
  python rco.py --model google/gemma-2-2b-it --layer 12 --max-dim 4       # runs dim.py at layer 12 first
  python rco.py --model Qwen/Qwen2.5-1.5B-Instruct --dim runs/Qwen2.5-1.5B-Instruct/dim/dim.safetensors
  python rco.py ... --resume                                              # after Ctrl-C or a crash
Writes per k DIR/k<k>/rco.safetensors (`basis`, k x d, orthonormal rows) and DIR/k<k>/rco.json (history, selection,
the scores of --eval-samples directions sampled from the cone as min, quartiles, max); DIR/rco_checkpoint.pt meanwhile.
"""
import argparse, glob, math, os, shutil, time

import torch
from tqdm.auto import tqdm

import common as C

p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
C.add_training_args(p, "rco")
p.add_argument("--min-dim", type=int, default=2, help="smallest cone dimension k (1: an RDO direction)")
p.add_argument("--max-dim", type=int, default=3, help="largest cone dimension (the paper goes up to 5)")
p.add_argument("--samples", type=int, default=16, help="cone samples per training example and step (Appendix A); "
               "a step costs about (samples + k) RDO steps")
p.add_argument("--eval-samples", type=int, default=256, help="directions sampled to evaluate each cone (Section 5)")
p.add_argument("--select-samples", type=int, default=64, help="selection: cone samples scored per candidate basis")
beyond = p.add_argument_group("beyond the paper, continued")
beyond.add_argument("--init", default=None, metavar="FILE", help="start the first cone from these directions "
                    "(e.g. rdo.safetensors) plus random vectors, instead of from random vectors only")


def gram_schmidt(B):
    """Orthonormal rows, in order: b_1 keeps its direction, b_2 loses its b_1 component, and so on (a QR would be
    free to flip signs, turning the cone inside out)."""
    rows = []
    for b in B:
        for q in rows:
            b = b - (b @ q) * q
        rows.append(b / b.norm())
    return torch.stack(rows)


# ----------------------------------------------------------------------------- COMPUTELOSS, lines 4-6

def compute_loss(S, R, examples, lambdas):
    """COMPUTELOSS with a direction per example: example i with R[i]. Leaves dL/dR in R.grad, L the mean over the
    examples; returns the three losses' means, unweighted, as floats."""
    lam_abl, lam_add, lam_ret = lambdas
    sums = {"abl": 0.0, "add": 0.0, "ret": 0.0}
    for idx, b in C.micro_batches(S.tok, examples, S.micro_batch, S.device):
        rr = R[idx].unsqueeze(1)                                            # (rows, 1, d): each row its own r
        L_abl = C.ablation_loss(S.model, rr, b["abl"])                      # COMPUTELOSS, line 3
        L_add = C.addition_loss(S.model, rr, b["add"], S.alpha, S.layer)    # COMPUTELOSS, line 4
        L_ret = C.retain_loss(S.model, rr, b["ret"])                        # COMPUTELOSS, line 5
        L = lam_abl * L_abl + lam_add * L_add + lam_ret * L_ret             # COMPUTELOSS, line 6
        (L.sum() / len(examples)).backward()
        for k, v in (("abl", L_abl), ("add", L_add), ("ret", L_ret)):
            sums[k] += v.sum().item() / len(examples)
    return sums


def cone_loss(S, B, examples, samples, lambdas, g):
    """Algorithm 2, lines 4-6 on a batch: every (example, direction) pair is one row. Leaves dL/dB in B.grad;
    returns the sample and basis parts' three losses."""
    n, k = len(examples), B.shape[0]
    s = C.sample_cone(k, n * samples, g).to(B)                              # Algorithm 2, line 4
    # a leaf of its own: each micro-batch's backward stops at R, and the chain rule through r = s B runs once
    R = (s @ B).detach().requires_grad_(True)
    sample = compute_loss(S, R, [x for x in examples for _ in range(samples)], lambdas)
    E = B.detach().repeat(n, 1).requires_grad_(True)                        # line 5: every b_i with every example
    basis = compute_loss(S, E, [x for x in examples for _ in range(k)], lambdas)
    B.grad = s.T @ R.grad + E.grad.view(n, k, -1).sum(0)                    # line 6: grad of L_sample + L_basis
    return sample, basis


# ----------------------------------------------------------------------------- selection and evaluation

def choose_basis(scored, sample_bypass):
    """Appendix A.3: among the bases whose every vector passes the filters (all of them if none does), the one whose
    cone samples have the lowest mean bypass score (the authors' ranking). sample_bypass(step) gives that score; it
    is recorded in `scored`. None if every candidate scored NaN."""
    passing = [s for s in scored if not any(v["discarded"] for v in s.get("vectors", [s]))]
    if not passing:
        print("no basis has every vector passing the filters: ranking them all by their cone samples")
    for s in passing or scored:
        s["sample_bypass"] = sample_bypass(s["step"])
    return min([s for s in passing or scored if math.isfinite(s["sample_bypass"])],
               key=lambda s: s["sample_bypass"], default=None)


def sample_bypass(S, B, coeffs, batch_size):
    """Mean bypass score of the cone samples r = s B: the refusal score of harmful prompts with r ablated."""
    scores = []
    for r in coeffs.to(B) @ B:
        with C.directional_ablation(S.model, r):
            scores.append(C.refusal_scores(C.last_logits(S.model, S.tok, S.harm_val, batch_size), S.refusal_ids).mean())
    return torch.stack(scores).mean().item()


def select_basis(S, iterates, args):
    """The chosen one of the last --select-last bases (step i's at index i), and every candidate's scores. Every
    candidate is scored on the same sample coefficients, so that they compare like directions of their cones."""
    scored = C.score_iterates(S.model, S.tok, iterates, S.alpha, S.layer, S.harm_val, S.safe_val, S.refusal_ids, args)
    coeffs = C.sample_cone(iterates[0].shape[0], args.select_samples, torch.Generator().manual_seed(args.seed))
    chosen = choose_basis(scored, lambda t: sample_bypass(S, iterates[t].to(S.device), coeffs, args.batch_size))
    if chosen is None:
        raise C.RefusalError("every candidate basis scored NaN in the selection: the training diverged; lower --lr")
    return chosen, scored


def quartiles(xs):
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0, .25, .5, .75, 1], dtype=torch.float64))
    return dict(zip(("min", "q1", "median", "q3", "max"), q.tolist()))


def evaluate_cone(S, B, args):
    """Arditi et al.'s bypass / induce / KL scores of --eval-samples directions sampled from the cone (a fixed seed),
    each with its distribution (Section 5, Figure 3)."""
    base_safe = C.last_logits(S.model, S.tok, S.safe_val, args.batch_size)
    coeffs = C.sample_cone(B.shape[0], args.eval_samples, torch.Generator().manual_seed(args.seed + 1)).to(B)
    scores = [C.score_direction(S.model, S.tok, S.alpha * r, S.layer, S.harm_val, S.safe_val, base_safe, S.refusal_ids,
                                args.batch_size) for r in tqdm(coeffs @ B, desc="evaluating the cone")]
    out = {key: [s[key] for s in scores] for key in ("bypass", "induce", "kl")}
    return {**out, **{f"{key}_quartiles": quartiles(values) for key, values in out.items()}}


# ----------------------------------------------------------------------------- Algorithm 2

def main(argv=None):
    args = p.parse_args(argv)
    t0 = time.time()
    if not 1 <= args.min_dim <= args.max_dim:
        raise C.RefusalError(f"need 1 <= --min-dim <= --max-dim, got {args.min_dim} and {args.max_dim}")
    C.check_counts(args, "samples", "eval_samples", "select_samples")
    out = args.out or C.model_dir(args.model, "rco")
    done = sorted(int(f.split(os.sep)[-2][1:]) for f in glob.glob(os.path.join(out, "k[0-9]*", "rco.safetensors")))
    if done and not (args.resume or args.overwrite or os.path.isfile(os.path.join(out, "rco_checkpoint.pt"))):
        raise C.RefusalError(f"'{out}' already holds cones of dimension {done}: pass --overwrite, or --out elsewhere")
    S = C.training_setup(args, "rco")
    d, lambdas = S.dim_vec.shape[-1], (args.lambda_abl, args.lambda_add, args.lambda_ret)
    # the (k-1)-cone's selection decides where the k-cone starts: its flags shape the run too
    run_key = {**S.run_key, **{f: getattr(args, f) for f in ("select_last", "kl_threshold", "induce_threshold")}}
    prev = torch.zeros(0, d)
    if args.init:  # e.g. an RDO direction: the 1-cone that Algorithm 2 would otherwise have to find again
        prev = C.load_direction(args.init, S.model)[0].reshape(-1, d).float().cpu()
        if len(prev) > args.min_dim:
            raise C.RefusalError(f"--init holds {len(prev)} directions, more than --min-dim {args.min_dim}")
        if torch.linalg.matrix_rank(prev) < len(prev):
            raise C.RefusalError(f"--init {args.init}: its directions are linearly dependent; pass independent ones")
        prev = gram_schmidt(prev)
    ck = C.load_checkpoint(S.ckpt, run_key) if args.resume else {"k": args.min_dim, "prev": prev}
    print(f"RCO at layer {S.layer}, alpha {S.alpha:.2f}, k = {ck['k']}..{args.max_dim}, {S.n} training pairs")

    for k in range(ck["k"], args.max_dim + 1):  # a resumed run skips the cones it finished
        g = torch.Generator().manual_seed(args.seed + k)
        fresh = torch.randn(k - len(ck["prev"]), d, generator=g)
        B = gram_schmidt(torch.cat([ck["prev"], fresh])).to(S.device).requires_grad_(True)    # Algorithm 2, line 1
        opt = torch.optim.AdamW([B], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0, amsgrad=args.amsgrad)
        order = C.batch_order(S.n, args.effective_batch, args.epochs, g)
        state = {"step": 0, "plateau": {"best": math.inf, "bad": 0, "drops": 0}, "history": [], "iterates": [],
                 "done": False}
        if "B" in ck:  # resuming inside this cone
            B.detach().copy_(ck["B"])
            opt.load_state_dict(ck["opt"])
            state, order = ck["state"], ck["order"]
            g.set_state(ck["rng"])  # the cone samples continue where they stopped
        bar = tqdm(total=S.total, initial=state["step"], desc=f"rco k={k}")
        while state["step"] < S.total and not state["done"]:                                  # Algorithm 2, line 2
            s = state["step"]
            batch = order[s * args.effective_batch:(s + 1) * args.effective_batch]
            examples = [S.examples[i] for i in batch]                                         # line 3
            opt.zero_grad()
            sample, basis = cone_loss(S, B, examples, args.samples, lambdas, g)               # lines 4-6
            loss = sum(lam * part[key] for part in (sample, basis) for lam, key in zip(lambdas, ("abl", "add", "ret")))
            C.check_finite(loss, B.grad, f"k = {k}, step {s}", S.ckpt)
            with torch.no_grad():
                grad_norm = C.sphere_step(opt, B, args.max_grad_norm)                         # line 7, row by row
                B.copy_(gram_schmidt(B))                                                      # line 8
            # the schedule watches the unweighted sum of every part, as the authors' code does
            watched = sum(sample.values()) + sum(basis.values())
            state["done"] = C.plateau(state["plateau"], watched, opt, args.patience, args.lr_drops)
            lr = opt.param_groups[0]["lr"]
            state["history"].append({"step": s, "loss": loss, "sample": sample, "basis": basis, "lr": lr,
                                     "grad_norm": grad_norm})
            state["iterates"].append(B.detach().cpu().clone())
            state["step"] += 1
            ck = {"k": k, "prev": ck["prev"], "B": B.detach().cpu(), "opt": opt.state_dict(), "state": state,
                  "order": order, "rng": g.get_state(), "run": run_key}
            C.save_checkpoint(S.ckpt, ck)
            bar.update(1)
            tqdm.write(f"k={k} step {s}: loss {loss:.4f} (samples: abl {sample['abl']:.4f}, add {sample['add']:.4f}, "
                       f"ret {sample['ret']:.4f}), lr {lr:.0e}" + (", plateau: stop" if state["done"] else ""))
        bar.close()

        chosen, scored = select_basis(S, state["iterates"], args)                             # Appendix A.3
        basis = state["iterates"][chosen["step"]]
        evaluation = {"samples": evaluate_cone(S, basis.to(S.device), args), "basis": chosen.get("vectors", [chosen])}
        meta = {**C.provenance(args, S.model), "layer": S.layer, "alpha": S.alpha, "k": k, "dim": S.dim_path,
                "dim_layer": S.dim_layer, "refusal_tokens": S.refusal_info, "chosen_step": chosen["step"],
                "refusal_targets_replaced": S.refusal_targets_replaced, "seconds": round(time.time() - t0, 1),
                "selection": scored, "history": state["history"], "evaluation": evaluation,
                "max_abs_offdiag_gram": (basis @ basis.T - torch.eye(k)).abs().max().item(),
                "data": {"train_pairs": S.n, "harmful_val": len(S.harm_val), "harmless_val": len(S.safe_val)}}
        path = C.save_result(os.path.join(S.out, f"k{k}"), "rco", {"basis": basis}, meta)
        q = evaluation["samples"]["bypass_quartiles"]
        print(f"k={k}: chose step {chosen['step']}; sampled directions' bypass score median {q['median']:.3f} "
              f"(worst {q['max']:.3f}); wrote {path}")
        ck = {"k": k + 1, "prev": basis, "run": run_key}
        C.save_checkpoint(S.ckpt, ck)

    for k in [k for k in done if not args.min_dim <= k <= args.max_dim]:  # only once this --overwrite run succeeded
        shutil.rmtree(os.path.join(S.out, f"k{k}"))
        print(f"removed the replaced run's cone {S.out}/k{k}")
    os.remove(S.ckpt)
    print(f"wrote {S.out}/k*/rco.safetensors and rco.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
