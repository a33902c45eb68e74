"""Representationally independent refusal directions (RepInd): Section 6.1 and Appendix A of the paper.

Algorithm 1 (rdo.py) with one more loss. Ablating a new direction r must not change how strongly an earlier
direction v is represented in the activations, nor ablating v how strongly r is (Definition 6.1):
  L_RepInd = sum_v mean_l [(cos(x_l, r) - cos(x~_l^abl(v), r))^2 + (cos(x_l, v) - cos(x~_l^abl(r), v))^2]
x_l is the input of block l on a harmful prompt, for the first 90% of layers (Table 3's layer cutoff), averaged over
the harmful instruction's tokens (Appendix A; the authors' code takes the last token: --repind-positions last).
x~^abl(u) is the forward pass with u ablated everywhere, so effects compound through the layers. v runs over DIM and
every RepInd direction found before r ("the sum of losses over all vectors", Appendix A).
  L = 1.0 L_abl + 0.2 L_add + 1.0 L_ret + 200 L_RepInd      (Table 3, "for all algorithms"; KL averaged over tokens)
Two epochs at most (the authors' code; the paper is silent). Runs vary a lot, so each direction trains --candidates
seeds, each one's final iterate chosen among its last 20 as in rdo.py, and keeps the candidate with the lowest
validation refusal score; five directions of five candidates each (Appendix A).

Usage:
  python repind.py --model google/gemma-2-2b-it --dim runs/gemma-2-2b-it/dim/dim.safetensors
  python repind.py ... --n-directions 3 --candidates 2 --repind-positions last
  python repind.py ... --resume                                   # after Ctrl-C or a crash
Writes DIR/repind.safetensors (tensor `directions`, (K, d), unit rows) and DIR/repind.json: every candidate's scores
and losses, the refusal score with the top-k directions ablated (Figure 8), and Figure 6's curves for each direction.
"""
import argparse, math, os, time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
    C.add_training_args(p, "repind")
    a = p.add_argument_group("RepInd (Section 6.1, Appendix A)").add_argument
    a("--lambda-repind", type=float, default=200.0, help="weight of L_RepInd (Table 3)")
    a("--repind-layers", type=float, default=0.9, help="L_RepInd covers this first fraction of the layers (Table 3)")
    a("--repind-positions", choices=("instruction", "last"), default="instruction", help="average L_RepInd over "
      "the harmful instruction's tokens (Appendix A), or take the last token (the authors' code)")
    a("--n-directions", type=int, default=5, help="directions, each independent of DIM and the earlier ones (A.3)")
    a("--candidates", type=int, default=5, help="seeds per direction; the lowest validation refusal score wins (A.3)")
    p.set_defaults(epochs=2)  # the authors' code; --lambda-ret keeps Table 3's 1.0 (the authors' 0.1 is on a summed KL)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the RepInd loss (Section 6.1)

def repind_mask(tok, prompts, positions="instruction"):
    """(batch, T) bool over C.tokenize(tok, prompts): where L_RepInd is averaged. "instruction" (Appendix A): the
    instruction's own tokens, neither the template's nor padding, i.e. those whose character spans overlap the
    instruction in the chat text; "last" (the authors' code): the last token, every row's under left padding."""
    texts, sentinel = C.format_chat(tok, prompts), "XQZSENTINELQZX"
    enc = tok(texts, add_special_tokens=False, padding=True, return_offsets_mapping=True, return_tensors="pt")
    start, end = enc["offset_mapping"].unbind(-1)
    if positions == "last":
        return torch.arange(start.shape[1]).expand_as(start) == start.shape[1] - 1
    before = max(C.format_chat(tok, [sentinel])[0].find(sentinel), 0)  # the template's text before the instruction
    lo = torch.tensor([text.find(p.strip(), before) for text, p in zip(texts, prompts)])[:, None]
    if (lo < 0).any():
        raise C.RefusalError("the chat template rewrites the instruction: use --repind-positions last")
    hi = lo + torch.tensor([len(p.strip()) for p in prompts])[:, None]
    return (start < hi) & (end > lo) & enc["attention_mask"].bool()


def block_acts(model, batch, cols, n_layers):
    """Inputs of blocks 0..n_layers-1 at positions `cols`: (batch, n_layers, len(cols), d); inside an ablation
    context, those of the ablated pass x~. The pass stops at block n_layers: the loss needs nothing after it."""
    with C.block_inputs(model, cols, stop_at=n_layers) as seen:
        C.forward(model, batch, logits_to_keep=1)
    return torch.stack([x.to(seen[0].device) for x in seen], 1)  # with --device multi the blocks sit on several GPUs


def repind_loss(model, r, others, batch, mask, n_layers):
    """L_RepInd per example: for each v in `others` (m, d), the two squared cosine changes, averaged over the first
    n_layers block inputs and the positions in `mask` (batch, T), summed over v. The gradient reaches r only."""
    cols = mask.any(0).nonzero().squeeze(1).cpu()  # only the positions some row averages over (CPU: any block's GPU)
    w = mask[:, cols] / mask[:, cols].sum(1, keepdim=True)  # each row's mean over its own positions
    unit = lambda x: F.normalize(x.float(), dim=-1)
    r_hat = unit(r)
    with torch.no_grad():
        x = unit(block_acts(model, batch, cols, n_layers))  # the clean pass does not depend on r
    with C.directional_ablation(model, r):
        x_r = unit(block_acts(model, batch, cols, n_layers))
    total = 0.0
    for v in unit(others.detach()):  # earlier directions stay fixed
        with torch.no_grad(), C.directional_ablation(model, v):
            x_v = unit(block_acts(model, batch, cols, n_layers))
        change = ((x - x_v) @ r_hat) ** 2 + ((x - x_r) @ v) ** 2  # ablate v, watch r; ablate r, watch v
        total = total + (change.mean(1) * w).sum(1)
    return total


# ----------------------------------------------------------------------------- one candidate: Algorithm 1 + L_RepInd

def compute_loss(S, args, r, examples, others, n_layers):
    """COMPUTELOSS plus L_RepInd on the same examples' harmful prompts; leaves dL/dr in r.grad, returns the parts."""
    n, sums = len(examples), {"abl": 0.0, "add": 0.0, "ret": 0.0, "repind": 0.0}
    for idx, b in C.micro_batches(S.tok, examples, S.micro_batch, S.device):
        harm = [examples[i][0] for i in idx]
        mask = repind_mask(S.tok, harm, args.repind_positions).to(S.device)
        L_abl = C.ablation_loss(S.model, r, b["abl"])                                        # COMPUTELOSS line 3
        L_add = C.addition_loss(S.model, r, b["add"], S.alpha, S.layer)                       # line 4
        L_ret = C.retain_loss(S.model, r, b["ret"])                                          # line 5
        L_ind = repind_loss(S.model, r, others, C.tokenize(S.tok, harm, S.device), mask, n_layers)  # Section 6.1
        L = args.lambda_abl * L_abl + args.lambda_add * L_add + args.lambda_ret * L_ret + args.lambda_repind * L_ind
        (L.sum() / n).backward()
        for k, part in zip(sums, (L_abl, L_add, L_ret, L_ind)):
            sums[k] += part.sum().item() / n
    return sums


def train_candidate(S, args, others, n_layers, seed, resume, save, name):
    """Algorithm 1 with L_RepInd from a random start, or from `resume` (this candidate's checkpoint); save(state)
    after every step. Returns every step's iterate and the loss history."""
    g = torch.Generator().manual_seed(seed)
    t = resume or {"r": F.normalize(torch.randn(C.hidden_size(S.model), generator=g), dim=0),  # Algorithm 1, line 1
                   "order": C.batch_order(S.n, args.effective_batch, args.epochs, g), "opt": None, "step": 0,
                   "done": False, "plateau": {"best": math.inf, "bad": 0, "drops": 0}, "iterates": [], "history": []}
    r = t["r"].clone().to(S.device).requires_grad_(True)
    opt = torch.optim.AdamW([r], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0, amsgrad=args.amsgrad)
    if t["opt"] is not None:
        opt.load_state_dict(t["opt"])
    bar = tqdm(total=S.total, initial=t["step"], desc=name)
    while t["step"] < S.total and not t["done"]:                                          # line 2
        s = t["step"]
        idx = t["order"][s * args.effective_batch:(s + 1) * args.effective_batch].tolist()  # line 3
        opt.zero_grad()
        sums = compute_loss(S, args, r, [S.examples[i] for i in idx], others, n_layers)     # line 4
        loss = sum(getattr(args, f"lambda_{k}") * part for k, part in sums.items())  # COMPUTELOSS line 6 + L_RepInd
        C.check_finite(loss, r.grad, f"{name}, step {s}", S.ckpt)
        with torch.no_grad():
            grad_norm = C.sphere_step(opt, r, args.max_grad_norm)                             # line 5
            r /= r.norm()                                                                     # line 6
        # the authors' schedule watches the unweighted sum of the parts, L_RepInd included
        t["done"] = C.plateau(t["plateau"], sum(sums.values()), opt, args.patience, args.lr_drops)
        t["iterates"].append(r.detach().cpu().clone())
        t["history"].append({"step": s, "loss": loss, **sums, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm})
        t.update(step=s + 1, r=r.detach().cpu().clone(), opt=opt.state_dict())
        save(t)
        bar.update(1)
        tqdm.write(f"{name} step {s}: loss {loss:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in sums.items())}), "
                   f"lr {opt.param_groups[0]['lr']:.0e}" + (", plateau: stop" if t["done"] else ""))
    bar.close()
    return t["iterates"], t["history"]


# ----------------------------------------------------------------------------- Figure 6 and Figure 8

@torch.no_grad()
def figure6(model, tok, prompts, dim_vec, others, batch_size):
    """Figure 6 for DIM and each u of `others` ({name: vector}): per block input, mean over the prompts at the last
    token, cos(x, u) clean and with DIM ablated, and cos(x, DIM) clean and with u ablated."""
    cos = lambda u: C.layer_cosines(model, tok, prompts, u[None], batch_size)[0].tolist()
    curves = {}
    for name, u in others.items():
        with C.directional_ablation(model, dim_vec):
            u_abl = cos(u)
        with C.directional_ablation(model, u):
            dim_abl = cos(dim_vec)
        curves[name] = {"cos_u_clean": cos(u), "cos_u_dim_ablated": u_abl, "cos_dim_clean": cos(dim_vec),
                        "cos_dim_u_ablated": dim_abl}
    return curves


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    C.check_counts(args, "n_directions", "candidates")
    if not 0 < args.repind_layers <= 1:
        raise C.RefusalError(f"--repind-layers {args.repind_layers} must lie in (0, 1]")
    S = C.training_setup(args, "repind")  # folder, checkpoint, data, model, refusal tokens, DIM, layer, alpha, targets
    model, tok = S.model, S.tok
    n_layers = max(1, int(args.repind_layers * len(C.decoder_layers(model))))  # the authors' int(0.9 L) block inputs
    # the selection runs inside the search: its settings shape what a checkpoint holds
    run_key = {**S.run_key, **{k: getattr(args, k) for k in ("select_last", "kl_threshold", "induce_threshold")}}
    ck = C.load_checkpoint(S.ckpt, run_key) if args.resume else {"run": run_key, "found": [], "cands": []}
    save_step = lambda train: C.save_checkpoint(S.ckpt, {**ck, "train": train})  # the unfinished candidate's state
    print(f"RepInd at layer {S.layer}, alpha {S.alpha:.2f}, {S.n} pairs, L_RepInd over block inputs 0..{n_layers - 1}"
          f" ({args.repind_positions} positions), {args.n_directions} direction(s) x {args.candidates} candidate(s)"
          + (f"; resumed at direction {len(ck['found']) + 1}, candidate {len(ck['cands']) + 1}" if args.resume else ""))
    while len(ck["found"]) < args.n_directions:  # Appendix A: each direction independent of DIM and the earlier ones
        k = len(ck["found"])
        others = torch.stack([S.dim_vec.float().cpu()] + [f["direction"] for f in ck["found"]]).to(S.device)
        while len(ck["cands"]) < args.candidates:
            seed = args.seed + k * args.candidates + len(ck["cands"])  # a different seed for every candidate
            name = f"direction {k + 1}, seed {seed}"
            iterates, history = train_candidate(S, args, others, n_layers, seed, ck.pop("train", None), save_step, name)
            scored = C.score_iterates(model, tok, iterates, S.alpha, S.layer, S.harm_val, S.safe_val, S.refusal_ids,
                                      args)
            pick = C.lowest_bypass(scored)  # Arditi et al.'s selection over the last iterates, as in rdo.py
            if pick is None:
                raise C.RefusalError(f"{name}: no iterate could be scored (NaN); lower --lr or use --dtype float32")
            ck["cands"].append({"seed": seed, "chosen_step": pick["step"], "scores": pick, "selection": scored,
                                "history": history, "direction": iterates[pick["step"]]})
            C.save_checkpoint(S.ckpt, ck)
            print(f"{name}: step {pick['step']}, bypass {pick['bypass']:.3f}, induce {pick['induce']:.3f}, "
                  f"kl {pick['kl']:.4f}")
        kept = C.lowest_bypass([c["scores"] for c in ck["cands"]])  # Appendix A: the lowest validation refusal
        best = next(c for c in ck["cands"] if c["scores"] is kept)  # score; as within a candidate, passing ones first
        cos_dim = F.cosine_similarity(best["direction"], others[0].cpu(), dim=0).item()
        cands = [{n: v for n, v in c.items() if n != "direction"} for c in ck["cands"]]
        ck["found"].append({**best, "cos_with_dim": cos_dim, "candidates": cands})
        ck["cands"] = []
        C.save_checkpoint(S.ckpt, ck)
        print(f"direction {k + 1}: kept seed {best['seed']} (validation refusal score {best['scores']['bypass']:.3f})")

    directions = torch.stack([f["direction"] for f in ck["found"]])
    score = lambda: C.refusal_scores(C.last_logits(model, tok, S.harm_val, args.batch_size), S.refusal_ids).mean()
    baseline, topk = score().item(), []
    for k in range(1, len(directions) + 1):  # Figure 8's question: directions 1..k ablated together
        with C.directional_ablation(model, directions[:k]):
            topk.append(score().item())
    curves = figure6(model, tok, S.harm_val, S.dim_vec, {f"repind{j + 1}": d for j, d in enumerate(directions)},
                     args.batch_size)
    meta = {**C.provenance(args, model), "layer": S.layer, "alpha": S.alpha, "dim": S.dim_path,
            "dim_layer": S.dim_layer, "loss_layers": n_layers, "refusal_tokens": S.refusal_info,
            "refusal_targets_replaced": S.refusal_targets_replaced,
            "directions": [{n: v for n, v in f.items() if n != "direction"} for f in ck["found"]],
            "baseline_refusal_score_harmful_val": baseline, "topk_bypass": topk, "figure6": curves,
            "data": {"train_pairs": S.n, "harmful_val": len(S.harm_val), "harmless_val": len(S.safe_val)},
            "seconds": round(time.time() - t0, 1)}
    path = C.save_result(S.out, "repind", {"directions": directions}, meta)
    os.remove(S.ckpt)
    print(f"validation refusal score: baseline {baseline:.3f}, top-k ablated {[round(x, 3) for x in topk]}")
    print(f"wrote {path} and {S.out}/repind.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
