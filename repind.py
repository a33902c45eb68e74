"""Representationally independent refusal directions (RepInd): Section 6.1 and Appendix A of the paper.

Algorithm 1 (rdo.py) with one more loss: a new direction r must not change how strongly each earlier
direction v (DIM, then every RepInd direction found before it) is represented, and vice versa:
  L_RepInd = sum_v  mean_l (cos(x_l, r) - cos(x~_l^abl(v), r))^2 + mean_l (cos(x_l, v) - cos(x~_l^abl(r), v))^2
x_l is the input of block l at the last token of a harmful prompt, for the first 90% of layers; x~^abl(u) is the
forward pass with u ablated everywhere (so effects compound through the layers).
  L = 1.0 L_abl + 0.2 L_add + 0.1 L_ret + 200 L_RepInd,  two epochs; otherwise as rdo.py.
Iterative: direction 1 is independent of DIM, direction 2 of DIM and direction 1, ... Runs vary a lot, so each
direction trains --candidates seeds (the final iterate chosen among the last ones as rdo.py does) and keeps the
candidate with the lowest validation refusal score (bypass score).

Usage:
  python repind.py --model google/gemma-2-2b-it --dim runs/gemma-2-2b-it/dim/dim.safetensors
  python repind.py ... --n-directions 3 --candidates 2 --compare runs/gemma-2-2b-it/rdo_perp/rdo.safetensors
  python repind.py ... --resume                                   # after Ctrl-C or a crash
Writes DIR/repind.safetensors (tensor `directions`, (K, d), unit rows) and DIR/repind.json: each direction's
scores, every candidate's loss history and scores, the composition of the top-k directions, and the curves of
Figure 6 (per layer: cos with and without the other's ablation, both ways) for DIM vs each RepInd direction and
DIM vs --compare; DIR/repind_checkpoint.pt while training.
"""
import os, time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C
import rdo


def parse_args(argv=None):
    p = rdo.training_parser(__doc__, "repind")
    a = p.add_argument
    a("--n-directions", type=int, default=5, help="RepInd directions to find, each independent of DIM and the earlier ones")
    a("--candidates", type=int, default=5, help="seeds trained per direction; the lowest validation refusal score wins")
    a("--lambda-ind", type=float, default=200.0, help="weight of the RepInd loss")
    a("--layer-cutoff", type=float, default=0.9, help="the RepInd loss covers the block inputs of this first fraction of layers")
    a("--compare", default=None, metavar="FILE", help="also draw Figure 6's curves for DIM vs this direction (e.g. RDO-perp)")
    p.set_defaults(epochs=2, lambda_ret=0.1)  # Appendix A: RepInd trains two epochs with a weaker retain loss
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the RepInd loss

def n_loss_layers(model, cutoff):
    return max(1, min(len(C.decoder_layers(model)), int(cutoff * len(C.decoder_layers(model)))))


def last_token_inputs(model, batch, n_layers):
    """Block inputs x_0 .. x_{n_layers-1} at the last position: (B, n_layers, d), in the model's dtype; inside an
    ablation context, the ablated inputs x~ (Definition 6.1). The forward pass stops at block n_layers."""
    with C.block_inputs(model, -1, stop_at=n_layers) as seen:
        C.forward(model, batch, logits_to_keep=1)
    return torch.stack([x.to(seen[0].device) for x in seen], 1)  # with --device multi the blocks sit on several GPUs


@torch.no_grad()
def cache_inputs(model, tok, prompts, n_layers, batch_size, ablate=None, desc=None):
    """last_token_inputs for every prompt, fp32, with `ablate` ablated everywhere (None: the clean model).

    The clean and the v-ablated activations do not depend on r: computed once per run, not at every step.
    """
    out = {}
    for idx, batch in C.length_batches(model, tok, prompts, batch_size, desc):
        if ablate is None:
            x = last_token_inputs(model, batch, n_layers)
        else:
            with C.directional_ablation(model, ablate):
                x = last_token_inputs(model, batch, n_layers)
        out.update(zip(idx, x.float()))
    return torch.stack([out[j] for j in range(len(prompts))])


def repind_terms(r, others, clean, by_v, by_r):
    """L_RepInd per example: clean (B, L, d), by_v (m, B, L, d) with each v ablated, by_r (B, L, d) with r
    ablated; others (m, d). Sum over v of the two mean-over-layers squared cosine changes. Only r gets gradients."""
    cos = lambda x, u: F.normalize(x.float(), dim=-1) @ u
    r_hat = F.normalize(r.float(), dim=0)
    v_hat = F.normalize(others.detach().float(), dim=-1)
    watch_r = (cos(clean, r_hat) - cos(by_v, r_hat)) ** 2  # (m, B, L): ablate v, watch r
    watch_v = (cos(clean, v_hat.T) - cos(by_r, v_hat.T)) ** 2  # (B, L, m): ablate r, watch v
    return watch_r.mean(-1).sum(0) + watch_v.mean(1).sum(-1)


def repind_loss_and_grad(model, tok, r, prompts, ids, acts, others, n_layers, weight, micro_batch):
    """weight * mean over the prompts of L_RepInd, backward into r.grad; returns the unweighted mean.

    acts = (clean (N, L, d), by_v (m, N, L, d)) cached for the whole training set, `ids` index into it. Only the
    r-ablated pass runs here, on the prompts alone (no targets), stopped after the last loss layer.
    """
    clean, by_v = acts
    total = 0.0
    for idx, batch in C.length_batches(model, tok, prompts, micro_batch):
        rows = torch.tensor([ids[j] for j in idx])
        with C.directional_ablation(model, r):
            by_r = last_token_inputs(model, batch, n_layers)
        per_example = repind_terms(r, others, clean[rows].to(by_r.device), by_v[:, rows].to(by_r.device), by_r)
        (weight * per_example.sum() / len(prompts)).backward()
        total += per_example.sum().item() / len(prompts)
    return total


# ----------------------------------------------------------------------------- one candidate (Algorithm 1 + L_RepInd)

def train_candidate(S, args, seed, activations, others, resume, save):
    """Train r from a random start (S: rdo.setup's namespace); returns the training state (history, iterates).
    activations() gives the cached clean and v-ablated block inputs (computed on first use)."""
    model, tok, n, device, total = S.model, S.tok, S.n, S.device, S.total
    n_layers = n_loss_layers(model, args.layer_cutoff)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(C.hidden_size(model), generator=g).to(device)
    r = (r / r.norm()).requires_grad_(True)
    opt = rdo.make_optimizer(r, args)
    order = rdo.batch_order(n, args.effective_batch, args.epochs, g)
    state = rdo.new_state()
    if resume is not None:
        with torch.no_grad():
            r.copy_(resume["r"].to(device))
        opt.load_state_dict(resume["opt"])
        state, order = resume["state"], resume["order"]

    acts = None
    bar = tqdm(total=total, initial=state["step"], desc=f"repind seed {seed}")
    while state["step"] < total and not state["done"]:
        s = state["step"]
        idx = order[s * args.effective_batch:(s + 1) * args.effective_batch].tolist()
        opt.zero_grad()
        acts = acts or activations()
        sums = rdo.loss_and_grad(model, tok, r, rdo.training_batch(S, idx), S.alpha, S.layer, S.lambdas,
                                 S.micro_batch)  # the three RDO losses ...
        sums["ind"] = repind_loss_and_grad(model, tok, r, [S.harm[i] for i in idx], idx, acts, others, n_layers,
                                           args.lambda_ind, S.micro_batch)  # ... plus L_RepInd, into the same r.grad
        sums["loss"] += args.lambda_ind * sums["ind"]
        rdo.check_finite(sums["loss"], r.grad, f"step {s} (seed {seed})", S.ckpt_path)
        with torch.no_grad():
            sums["grad_norm"] = rdo.sphere_step(opt, r, args.max_grad_norm)
            r /= r.norm()
        rdo.record_step(opt, state, sums, r, args)
        save({"r": r.detach().cpu(), "opt": opt.state_dict(), "state": state, "order": order, "seed": seed})
        bar.update(1)
        tqdm.write(f"seed {seed} step {s}: loss {sums['loss']:.4f} (abl {sums['abl']:.4f}, add {sums['add']:.4f}, "
                   f"ret {sums['ret']:.4f}, ind {sums['ind']:.5f}), lr {opt.param_groups[0]['lr']:.0e}"
                   + (", plateau: stop" if state["done"] else ""))
    bar.close()
    return state


# ----------------------------------------------------------------------------- Figure 6 and the composition

def figure6(model, tok, prompts, dim_vec, others, n_layers, batch_size):
    """Per layer, mean over prompts at the last token: cos(x, u) clean and with DIM ablated, cos(x, DIM) clean and
    with u ablated, for each u in `others` ({name: vector}); plus the mean |change| over the loss layers."""
    names, vecs = list(others), torch.stack([others[k].float().cpu() for k in others])
    clean = C.layer_cosines(model, tok, prompts, torch.cat([dim_vec.float().cpu()[None], vecs]), batch_size)
    with C.directional_ablation(model, dim_vec):
        abl_dim = C.layer_cosines(model, tok, prompts, vecs, batch_size)
    curves = {}
    for j, name in enumerate(names):
        with C.directional_ablation(model, vecs[j].to(C.input_device(model))):
            abl_u = C.layer_cosines(model, tok, prompts, dim_vec, batch_size)[0]
        c = {"cos_u_clean": clean[j + 1], "cos_u_dim_ablated": abl_dim[j], "cos_dim_clean": clean[0], "cos_dim_u_ablated": abl_u}
        curves[name] = {k: v.tolist() for k, v in c.items()}
        curves[name]["mean_abs_change_u_when_dim_ablated"] = (clean[j + 1] - abl_dim[j])[:n_layers].abs().mean().item()
        curves[name]["mean_abs_change_dim_when_u_ablated"] = (clean[0] - abl_u)[:n_layers].abs().mean().item()
    return curves


@torch.no_grad()
def topk_bypass(model, tok, directions, prompts, batch_size):
    """Mean validation refusal score with directions 1..k ablated together, for k = 1..K (Figure 8's question)."""
    ids = C.refusal_token_ids(tok)
    out = []
    for k in range(1, len(directions) + 1):
        with C.directional_ablation(model, directions[:k]):
            out.append(C.refusal_scores(C.last_logits(model, tok, prompts, batch_size), ids).mean().item())
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    C.check_counts(args, "n_directions", "candidates")
    if not 0 < args.layer_cutoff <= 1:
        raise C.RefusalError(f"--layer-cutoff {args.layer_cutoff} must lie in (0, 1]")
    S = rdo.setup(args, "repind")  # folder, checkpoint path, data, model, DIM, layer, alpha, targets: as rdo.py
    model, tok, device, out, ckpt_path, harm = S.model, S.tok, S.device, S.out, S.ckpt_path, S.harm
    harm_val, safe_val, dim_vec, layer, alpha = S.harm_val, S.safe_val, S.dim_vec, S.layer, S.alpha
    compare = C.load_direction(args.compare, model)[0].reshape(-1, C.hidden_size(model))[0] if args.compare else None
    n_layers = n_loss_layers(model, args.layer_cutoff)
    print(f"RepInd at layer {layer}, alpha {alpha:.2f}, {S.n} training pairs, loss over block inputs 0..{n_layers - 1}, "
          f"{args.n_directions} direction(s) x {args.candidates} candidate(s)")

    run_key = {**S.run_key, **{k: getattr(args, k) for k in ("lambda_ind", "layer_cutoff", "candidates",
                                                              *rdo.SELECTION_FLAGS)}}
    ck = {"run": run_key, "found": [], "cands": [], "train": None}
    if args.resume:
        ck = C.load_checkpoint(ckpt_path, run_key)
        print(f"resumed at direction {len(ck['found']) + 1}, candidate {len(ck['cands']) + 1} from {ckpt_path}")
    save = lambda: C.atomic_write(ckpt_path, lambda tmp: torch.save(ck, tmp))  # Ctrl-C loses at most one step

    # the clean and each v-ablated pass do not depend on r: once per run and v, when a step first needs them
    cached = []

    def activations(others):
        while len(cached) < 1 + len(others):
            v = None if not cached else others[len(cached) - 1]
            cached.append(cache_inputs(model, tok, harm, n_layers, args.batch_size, v,
                                       desc="clean activations" if v is None else f"ablated v{len(cached) - 1}"))
        return cached[0], torch.stack(cached[1:1 + len(others)])

    while len(ck["found"]) < args.n_directions:
        k = len(ck["found"])
        others = torch.stack([dim_vec.float().cpu()] + [f["direction"] for f in ck["found"]]).to(device)
        while len(ck["cands"]) < args.candidates:
            seed = args.seed + k * args.candidates + len(ck["cands"])  # a different seed for every candidate

            def save_step(train):
                ck["train"] = train
                save()
            state = train_candidate(S, args, seed, lambda: activations(others), others, ck["train"], save_step)
            chosen, scored = rdo.select_iterate(model, tok, state["iterates"], alpha, layer, harm_val, safe_val, args)
            ck["cands"].append({"seed": seed, "chosen_step": chosen["step"], "scores": chosen, "selection": scored,
                                "history": state["history"], "direction": state["iterates"][chosen["step"]]})
            ck["train"] = None
            save()
            print(f"direction {k + 1}, seed {seed}: step {chosen['step']}, bypass {chosen['bypass']:.3f}, "
                  f"induce {chosen['induce']:.3f}, kl {chosen['kl']:.4f}")
        best = min(ck["cands"], key=lambda c: c["scores"]["bypass"])
        ck["found"].append({**best, "candidates": [{k2: v for k2, v in c.items() if k2 != "direction"} for c in ck["cands"]]})
        ck["cands"] = []
        save()
        print(f"direction {k + 1}: kept seed {best['seed']} (validation refusal score {best['scores']['bypass']:.3f})")

    directions = torch.stack([f["direction"] for f in ck["found"]])
    ids = C.refusal_token_ids(tok)
    baseline = C.refusal_scores(C.last_logits(model, tok, harm_val, args.batch_size), ids).mean().item()
    pairs = {f"repind{j + 1}": directions[j] for j in range(len(directions))}
    if compare is not None:
        pairs["compare"] = compare
    curves = figure6(model, tok, harm_val, dim_vec, pairs, n_layers, args.batch_size)
    dim_unit = dim_vec.float().cpu() / dim_vec.norm().item()
    found = [{"index": j + 1, "cos_with_dim": (directions[j] @ dim_unit).item(),
              **{k2: v for k2, v in f.items() if k2 != "direction"}} for j, f in enumerate(ck["found"])]
    meta = {"model": args.model, "layer": layer, "alpha": alpha, **C.provenance(args, model), "dim": args.dim, "dim_layer": S.dim_layer,
            "dim_alpha": dim_vec.norm().item(), "loss_layers": n_layers, "compare": args.compare, "directions": found,
            "baseline_refusal_score_harmful_val": baseline,
            "topk_bypass": topk_bypass(model, tok, directions.to(device), harm_val, args.batch_size),
            "figure6": curves, "data": {"train_pairs": S.n, "harmful_val": len(harm_val), "harmless_val": len(safe_val)},
            "seconds": round(time.time() - t0, 1)}
    path = C.save_result(out, "repind", {"directions": directions}, meta)
    os.remove(ckpt_path)
    for name, c in curves.items():
        print(f"{name}: mean |change in cos| over layers 0..{n_layers - 1}: {name} when DIM ablated "
              f"{c['mean_abs_change_u_when_dim_ablated']:.4f}, DIM when {name} ablated {c['mean_abs_change_dim_when_u_ablated']:.4f}")
    print(f"validation refusal score: baseline {baseline:.3f}, top-k ablated {[round(x, 3) for x in meta['topk_bypass']]}")
    print(f"wrote {path}, {out}/repind.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
