"""Refusal Direction Optimization: Algorithm 1 of the paper (Section 4, Appendix A).

Algorithm 1 trains a unit direction r so that
  ablating r everywhere makes the model answer harmful prompts     L_abl = CE(f_ablate(r)(p_harm), t_answer)
  adding alpha * r at layer l makes it refuse harmless prompts     L_add = CE(f_add(alpha r, l)(p_safe), t_refusal)
  ablating r leaves harmless answers as they were                  L_ret = KL(f(p_safe + t_retain) || f_ablate(r)(...))

  1: r <- random unit vector
  2: while not converged:
  3:   sample a batch of (p_harm, p_safe) with their targets
  4:   L <- COMPUTELOSS(r): lambda_abl L_abl + lambda_add L_add + lambda_ret L_ret
  5:   r <- r - lr * (grad L projected onto the sphere's tangent at r)    (AdamW)
  6:   r <- r / |r|

Defaults (Appendix A): lambdas 1.0 / 0.2 / 1.0, AdamW lr 0.01, betas (0.9, 0.98), effective batch 16, lr / 10 when
the loss has not improved for 5 steps (at most twice, then stop), one epoch; the final r is chosen among the last
20 iterates with Arditi et al.'s selection scores on validation prompts. The targets come from the DIM direction:
t_answer = 30 greedy tokens with DIM ablated, t_refusal = greedy tokens with DIM added up to the first '.',
t_retain = 29 greedy tokens, no intervention.

Usage:
  python rdo.py --model google/gemma-2-2b-it --layer 12          # runs dim.py at layer 12 first
  python rdo.py --model Qwen/Qwen2.5-1.5B-Instruct --dim runs/Qwen2.5-1.5B-Instruct/dim/dim.safetensors
  python rdo.py ... --orthogonal-to runs/.../dim/dim.safetensors --out runs/x/rdo_perp     # RDO-perp
  python rdo.py ... --resume                                     # after Ctrl-C or a crash
Writes DIR/rdo.safetensors (`direction`, unit norm; `iterates`, every step's r) and DIR/rdo.json (layer, alpha,
loss history, the chosen step and its scores, flags, versions); DIR/rdo_checkpoint.pt while it trains.
"""
import argparse, os, time

import torch
from tqdm.auto import tqdm

import common as C

p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
C.add_training_args(p, "rdo")
p.add_argument("--orthogonal-to", nargs="+", default=[], metavar="FILE",
               help="RDO-perp: stay orthogonal to these directions (Section 6)")
beyond = p.add_argument_group("beyond the paper, continued")
beyond.add_argument("--init", default=None, metavar="FILE",
                    help="start from this direction (a .safetensors file, or 'dim') instead of a random one")
beyond.add_argument("--sign-warmup", type=int, default=0, metavar="K",
                    help="the first K steps without the addition loss (the schedule watches L_abl + L_ret), then r "
                         "takes the sign whose addition loss is lower (L_abl and L_ret are even in r, so the warm-up "
                         "leaves its sign free), also where the schedule stops the run sooner")


# ----------------------------------------------------------------------------- COMPUTELOSS

def compute_loss(S, r, examples, lambdas):
    """COMPUTELOSS over a batch of (p_harm, p_safe, t_answer, t_refusal, t_retain), leaving dL/dr in r.grad.
    Each loss is a mean over examples; micro-batches bound the memory and do not change the result.
    Returns the three losses, unweighted, as floats."""
    lam_abl, lam_add, lam_ret = lambdas
    sums = {"abl": 0.0, "add": 0.0, "ret": 0.0}
    for idx, b in C.micro_batches(S.tok, examples, S.micro_batch, S.device):
        L_abl = C.ablation_loss(S.model, r, b["abl"])                      # COMPUTELOSS, line 3
        with torch.set_grad_enabled(lam_add != 0):  # --sign-warmup's steps report L_add without training on it
            L_add = C.addition_loss(S.model, r, b["add"], S.alpha, S.layer)  # COMPUTELOSS, line 4
        L_ret = C.retain_loss(S.model, r, b["ret"])                         # COMPUTELOSS, line 5
        L = lam_abl * L_abl + lam_add * L_add + lam_ret * L_ret             # COMPUTELOSS, line 6
        (L.sum() / len(examples)).backward()
        for k, v in (("abl", L_abl), ("add", L_add), ("ret", L_ret)):
            sums[k] += v.sum().item() / len(examples)
    return sums


# ----------------------------------------------------------------------------- beyond the paper: --init, --sign-warmup

def initial_direction(args, S, basis, g):
    """Algorithm 1, line 1: a random unit vector (or --init), orthogonal to `basis` for RDO-perp. The random draw
    happens either way, so that a seed gives the same batches with and without --init."""
    r = torch.randn(S.dim_vec.shape[-1], generator=g)
    if args.init:
        r = (S.dim_vec if args.init == "dim" else C.load_direction(args.init, S.model)[0]).reshape(-1, len(r))
        if len(r) != 1:
            raise C.RefusalError(f"--init {args.init} holds {len(r)} directions; rdo.py starts from one")
        r = r[0].float().cpu()
    r = project_out((r / r.norm()).to(S.device), basis)
    if r.norm() < 1e-3:
        raise C.RefusalError(f"--init {args.init} lies in the span of --orthogonal-to: nothing is left to start from")
    return r / r.norm()


@torch.no_grad()
def choose_sign(S, r, opt, examples):
    """End of --sign-warmup: keep r or -r, whichever has the lower addition loss on this batch. Adam's first moment
    flips with r (the second does not change), so the steps after a flip are mirrored too."""
    def addition(v):
        return sum(C.addition_loss(S.model, v, b["add"], S.alpha, S.layer).sum().item()
                   for _, b in C.micro_batches(S.tok, examples, S.micro_batch, S.device))
    flip = addition(-r) < addition(r)
    if flip:
        r.neg_()
        opt.state[r]["exp_avg"].neg_()
    return flip


def project_out(r, basis):
    """RDO-perp: remove the span of `basis` (orthonormal rows) from r."""
    return r if basis is None else r - (r @ basis.T) @ basis


# ----------------------------------------------------------------------------- Algorithm 1

def main(argv=None):
    args = p.parse_args(argv)
    t0 = time.time()
    S = C.training_setup(args, "rdo")
    basis = None
    if args.orthogonal_to:
        basis = C.unit_basis(torch.cat([C.load_direction(f, S.model)[0].reshape(-1, S.dim_vec.shape[-1])
                                        for f in args.orthogonal_to])).to(S.device)
        S.run_key["orthogonal_to"] = C.tensor_hash(basis)
    if args.sign_warmup and not 0 < args.sign_warmup < S.total:
        raise C.RefusalError(f"--sign-warmup {args.sign_warmup}: give 0 (off) or fewer steps than the run's {S.total}")
    print(f"RDO at layer {S.layer}, alpha {S.alpha:.2f}, {S.n} training pairs, "
          f"{S.total} steps of {args.effective_batch}")

    g = torch.Generator().manual_seed(args.seed)
    r = initial_direction(args, S, basis, g).requires_grad_(True)                       # Algorithm 1, line 1
    opt = torch.optim.AdamW([r], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0, amsgrad=args.amsgrad)
    order = C.batch_order(S.n, args.effective_batch, args.epochs, g)
    state = {"step": 0, "plateau": {"best": float("inf"), "bad": 0, "drops": 0}, "history": [], "iterates": [],
             "done": False}
    if args.resume:
        ck = C.load_checkpoint(S.ckpt, S.run_key)
        with torch.no_grad():
            r.copy_(ck["r"].to(S.device))
        opt.load_state_dict(ck["opt"])
        state, order = ck["state"], ck["order"]
        print(f"resumed at step {state['step']} from {S.ckpt}")

    bar = tqdm(total=S.total, initial=state["step"], desc="rdo")
    while state["step"] < S.total and not state["done"]:                               # Algorithm 1, line 2
        s = state["step"]
        batch = order[s * args.effective_batch:(s + 1) * args.effective_batch]
        examples = [S.examples[i] for i in batch]                                      # Algorithm 1, line 3
        lam_add = 0.0 if s < args.sign_warmup else args.lambda_add
        opt.zero_grad()
        losses = compute_loss(S, r, examples, (args.lambda_abl, lam_add, args.lambda_ret))  # Algorithm 1, line 4
        loss = args.lambda_abl * losses["abl"] + args.lambda_add * losses["add"] + args.lambda_ret * losses["ret"]
        C.check_finite(loss, r.grad, f"step {s}", S.ckpt)
        with torch.no_grad():
            grad_norm = C.sphere_step(opt, r, args.max_grad_norm)                       # Algorithm 1, line 5
            r.copy_(project_out(r, basis))
            r /= r.norm()                                                               # Algorithm 1, line 6
        # the schedule watches the unweighted sum, as the authors' code does (the paper does not say); during
        # --sign-warmup only the losses that train, and it starts over once the addition loss joins them
        watched = sum(losses.values()) - (losses["add"] if s < args.sign_warmup else 0.0)
        state["done"] = C.plateau(state["plateau"], watched, opt, args.patience, args.lr_drops)
        flipped = None
        if s < args.sign_warmup and (s + 1 == args.sign_warmup or state["done"]):  # the warm-up ends here
            flipped = choose_sign(S, r, opt, examples)
            state["plateau"].update(best=float("inf"), bad=0)
        lr = opt.param_groups[0]["lr"]
        state["history"].append({"step": s, "loss": loss, **losses, "lr": lr, "grad_norm": grad_norm,
                                 **({"flipped": flipped} if flipped is not None else {})})
        state["iterates"].append(r.detach().cpu().clone())
        state["step"] += 1
        C.save_checkpoint(S.ckpt, {"r": r.detach().cpu(), "opt": opt.state_dict(), "state": state, "order": order,
                                   "run": S.run_key})
        bar.update(1)
        tqdm.write(f"step {s}: loss {loss:.4f} (abl {losses['abl']:.4f}, add {losses['add']:.4f}, "
                   f"ret {losses['ret']:.4f}), lr {lr:.0e}" + (", plateau: stop" if state["done"] else "")
                   + ("" if flipped is None else f", sign warm-up over: r {'flipped' if flipped else 'kept'}"))
    bar.close()

    # the final direction: Arditi et al.'s selection over the last iterates (Appendix A.3)
    scored = C.score_iterates(S.model, S.tok, state["iterates"], S.alpha, S.layer, S.harm_val, S.safe_val,
                              S.refusal_ids, args)
    chosen = C.lowest_bypass(scored)
    if chosen is None:
        raise C.RefusalError("every iterate scored NaN in the selection: the training diverged; lower --lr")
    if chosen["discarded"]:
        print(f"no iterate passes every selection filter: took the best near miss, step {chosen['step']}")
    direction = state["iterates"][chosen["step"]]
    meta = {**C.provenance(args, S.model), "layer": S.layer, "alpha": S.alpha, "dim": S.dim_path,
            "dim_layer": S.dim_layer, "dim_alpha": S.dim_vec.norm().item(), "refusal_tokens": S.refusal_info,
            "orthogonal_to": args.orthogonal_to, "init": args.init or "random", "sign_warmup": args.sign_warmup,
            "refusal_targets_replaced": S.refusal_targets_replaced, "chosen_step": chosen["step"],
            "chosen_scores": chosen, "selection": scored, "history": state["history"],
            "max_abs_cos_with_orthogonal_to": None if basis is None else (basis.cpu() @ direction).abs().max().item(),
            "data": {"train_pairs": S.n, "harmful_val": len(S.harm_val), "harmless_val": len(S.safe_val)},
            "seconds": round(time.time() - t0, 1)}
    path = C.save_result(S.out, "rdo", {"direction": direction, "iterates": torch.stack(state["iterates"])}, meta)
    os.remove(S.ckpt)
    print(f"chose step {chosen['step']}: bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, "
          f"kl {chosen['kl']:.4f}\nwrote {path} and {S.out}/rdo.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
