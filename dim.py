"""Difference-in-means refusal direction with the direction selection of Arditi et al. (2024).

The paper's Section 2 baseline, and the starting point of RDO (its alpha, layer and training targets):
  1. mean block-input activations over harmful minus harmless train prompts, at every post-instruction
     position i and every layer l:  v_i^(l) = mean_harm x_i^(l) - mean_safe x_i^(l)
  2. score each candidate v_i^(l) on validation prompts:
       bypass  mean refusal score of harmful prompts with v ablated everywhere      (lower = better)
       induce  mean refusal score of harmless prompts with v added at layer l       (must be >= 0)
       kl      KL(P_base || P_ablated) at the last position of harmless prompts     (must be <= 0.1)
  3. discard candidates in the last 20% of layers, with KL > 0.1, induce < 0 or NaN; pick the lowest bypass.

Usage:
  python dim.py --model Qwen/Qwen2.5-1.5B-Instruct
  python dim.py --model ~/models/qwen --harmful harm.json --harmless safe.json --n-train 128 --n-val 32
  python dim.py --model google/gemma-2-2b-it --layer 12        # best position at a fixed layer
Writes runs/<model>/dim/dim.safetensors (tensor `direction`, raw: alpha = its norm; `candidates`, all v_i^(l))
and dim.json (layer, position, alpha, every candidate's scores, flags, versions) + dim.png with matplotlib.
"""
import argparse, math, os, time

import torch
from tqdm.auto import tqdm

import common as C


N_TRAIN = 128  # training prompts per class, as Arditi et al.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
    C.add_common_args(p, "dim", n_train=N_TRAIN)
    p.add_argument("--layer", type=int, default=None,
                   help="only this layer: its best position, the best near miss if none passes the filters (default: all layers)")
    p.add_argument("--kl-threshold", type=float, default=0.1, help="discard candidates whose ablation KL exceeds this")
    p.add_argument("--induce-threshold", type=float, default=0.0, help="discard candidates whose induce score is below this")
    p.add_argument("--prune-layers", type=float, default=0.2, help="discard candidates in this last fraction of layers")
    p.add_argument("--filter-prompts", action="store_true",
                   help="keep only harmful prompts the model refuses (refusal score > 0) and harmless ones it does not")
    return p.parse_args(argv)


def filter_prompts(model, tok, prompts, refusal_ids, harmful, batch_size):
    """Arditi et al.'s optional filter: harmful prompts the model refuses, harmless ones it answers."""
    scores = C.refusal_scores(C.last_logits(model, tok, prompts, batch_size), refusal_ids)
    return [p for p, s in zip(prompts, scores.tolist()) if (s > 0 if harmful else s < 0)]


@torch.no_grad()
def mean_activations(model, tok, instructions, n_post, batch_size):
    """Mean block-input activation at the last n_post positions of every layer: (n_post, n_layers, d), float64."""
    n_layers = len(C.decoder_layers(model))
    total = torch.zeros(n_post, n_layers, C.hidden_size(model), dtype=torch.float64)
    for _, batch in C.length_batches(model, tok, instructions, batch_size, desc="means"):
        # hidden_states[l] is the input of block l (hidden_states[0] = embeddings); the last entry is after the
        # final norm and is not a block input. Left padding puts the post-instruction tokens at the end.
        hs = C.forward(model, batch, output_hidden_states=True, logits_to_keep=1).hidden_states[:n_layers]
        total += torch.stack([h[:, -n_post:].double().sum(0).cpu() for h in hs], dim=1)
    return total / len(instructions)


def score_direction(model, tok, v, layer, harmful_val, harmless_val, base_safe, refusal_ids, batch_size):
    """The three selection scores of one direction v (its norm is the addition strength) at `layer`."""
    with C.directional_ablation(model, v):  # one ablated pass serves the bypass score and the KL
        abl = C.last_logits(model, tok, harmful_val + harmless_val, batch_size)
    with C.activation_addition(model, v, layer):
        add = C.last_logits(model, tok, harmless_val, batch_size)
    return {"bypass": C.refusal_scores(abl[:len(harmful_val)], refusal_ids).mean().item(),
            "induce": C.refusal_scores(add, refusal_ids).mean().item(),
            "kl": C.kl_last(base_safe, abl[len(harmful_val):])}


def score_candidates(model, tok, candidates, layers, harmful_val, harmless_val, refusal_ids, batch_size):
    """bypass / induce / kl for each candidate v_i^(l) with l in `layers`; NaN elsewhere. Arrays (n_post, n_layers)."""
    n_post, n_layers, _ = candidates.shape
    scores = {k: torch.full((n_post, n_layers), math.nan, dtype=torch.float64) for k in ("bypass", "induce", "kl")}
    base_safe = C.last_logits(model, tok, harmless_val, batch_size)
    # Where every prompt has the same token and no block has mixed in context yet (layer 0: embeddings), the
    # difference is zero: no direction to score.
    tiny = 1e-6 * candidates.norm(dim=-1).max()
    grid = [(i, l) for i in range(n_post) for l in layers if candidates[i, l].norm() > tiny]
    bar = tqdm(grid, desc="candidates")
    for i, l in bar:
        s = score_direction(model, tok, candidates[i, l].float(), l, harmful_val, harmless_val, base_safe,
                            refusal_ids, batch_size)
        for k in scores:
            scores[k][i, l] = s[k]
        bar.set_postfix(pos=i - n_post, layer=l, **{k: f"{v:.3f}" for k, v in s.items()})
    return scores


def discard_reasons(s, kl_threshold=0.1, induce_threshold=0.0):
    """Arditi et al.'s score filters for one candidate's scores (empty list = kept)."""
    if any(math.isnan(s[k]) for k in ("bypass", "induce", "kl")):
        return ["nan/not scored"]
    return [f"kl>{kl_threshold}"] * (s["kl"] > kl_threshold) + [f"induce<{induce_threshold}"] * (s["induce"] < induce_threshold)


def first_pruned_layer(n_layers, prune_layers):
    """Layers from here on are in the last `prune_layers` of the model, as Arditi et al.'s code counts them
    (int(n * (1 - f)): 19 of Qwen-0.5B's 24 layers, 20 of Gemma-2-2B's 26)."""
    return int(n_layers * (1 - prune_layers))


def select_direction(scores, n_layers, kl_threshold=0.1, prune_layers=0.2, layer=None, induce_threshold=0.0):
    """Arditi et al.'s filters, then the lowest bypass score. Returns ((pos_index, layer), reasons per candidate).

    reasons[(i, l)] lists why a candidate was discarded (empty = kept). `layer` pins the layer (the user asked
    for it), so the layer-pruning rule does not apply there. Returns (None, reasons) if nothing survives.
    """
    n_post = scores["bypass"].shape[0]
    cutoff = first_pruned_layer(n_layers, prune_layers) if layer is None else n_layers
    reasons = {}
    for i in range(n_post):
        for l in range(n_layers):
            why = ["other layer"] * (layer is not None and l != layer) + [f"layer in last {prune_layers:.0%}"] * (l >= cutoff)
            reasons[(i, l)] = why + discard_reasons({k: scores[k][i, l].item() for k in scores}, kl_threshold, induce_threshold)
    kept = [c for c, why in reasons.items() if not why]
    if not kept:
        return None, reasons
    return min(kept, key=lambda c: scores["bypass"][c].item()), reasons


def best_per_criterion(scores, reasons):
    """What to say when every candidate is discarded: the best candidate by each score, and the lowest-bypass
    one among those that fail a single rule (e.g. 'only_kl>0.1': it passes everything but the KL filter)."""
    scored = [c for c in reasons if "nan/not scored" not in reasons[c] and "other layer" not in reasons[c]]
    describe = lambda c: {"position_index": c[0], "layer": c[1], **{s: scores[s][c].item() for s in scores}}
    best = {k: describe(f(scored, key=lambda c: scores[k][c].item())) for k, f in (("bypass", min), ("kl", min), ("induce", max))} \
        if scored else {}
    for rule in sorted({w for c in scored for w in reasons[c]}):
        near = [c for c in scored if reasons[c] == [rule]]
        if near:
            best[f"only_{rule}"] = describe(min(near, key=lambda c: scores["bypass"][c].item()))
    return best


def near_miss(items, bypass, reasons):
    """When nothing passes every filter: the lowest-bypass item within the KL bound (it bounds the side effects;
    the induce rule is strict for models that refuse weakly), else one failing a single rule, else any that was
    scored. `bypass` and `reasons` map an item to its bypass score and discard reasons. None if none scored."""
    scored = [c for c in items if "nan/not scored" not in reasons(c)]
    tiers = ([c for c in scored if not any(w.startswith("kl>") for w in reasons(c))],
             [c for c in scored if len(reasons(c)) == 1], scored)
    pool = next((t for t in tiers if t), [])
    return min(pool, key=bypass) if pool else None


def plot_scores(scores, path, n_post, chosen, kl_threshold=0.1, induce_threshold=0.0):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("bypass", "induce", "kl")):
        for i in range(n_post):
            ax.plot(scores[key][i].numpy(), marker=".", label=f"pos {i - n_post}")
        if chosen:
            ax.plot(chosen[1], scores[key][chosen].item(), "k*", markersize=14, label="chosen")
        ax.set(title=key, xlabel="layer")
    axes[1].axhline(induce_threshold, color="r", lw=0.8, ls="--")  # the filters: keep above / below the red lines
    axes[2].axhline(kl_threshold, color="r", lw=0.8, ls="--")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    C.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def load_data(args):
    """(harmful train, harmful val, harmless train, harmless val) from the data flags; before the model loads,
    so that a bad file fails fast."""
    harm_train, harm_val = C.get_prompts(args.harmful, args.n_train, args.n_val, args.harmful_val, args.seed)
    safe_train, safe_val = C.get_prompts(args.harmless, args.n_train, args.n_val, args.harmless_val, args.seed)
    return harm_train, harm_val, safe_train, safe_val


def compute_dim(model, tok, args, data, log=print):
    """Steps 1-3 on a loaded model and load_data's prompts. Returns (direction, info dict); rdo.py uses it too."""
    refusal_ids = C.refusal_token_ids(tok)
    post_ids = C.post_instruction_ids(tok)
    n_post, n_layers = len(post_ids), len(C.decoder_layers(model))
    if args.layer is not None:
        C.check_layer(model, args.layer)
    harm_train, harm_val, safe_train, safe_val = data
    if args.filter_prompts:
        harm_train, harm_val = (filter_prompts(model, tok, x, refusal_ids, True, args.batch_size) for x in (harm_train, harm_val))
        safe_train, safe_val = (filter_prompts(model, tok, x, refusal_ids, False, args.batch_size) for x in (safe_train, safe_val))
        if not (harm_train and harm_val and safe_train and safe_val):
            raise C.RefusalError("--filter-prompts left no prompts in a split: the model refuses no harmful prompt "
                                 "(or every harmless one); run without --filter-prompts")
    log(f"data: {len(harm_train)}/{len(harm_val)} harmful and {len(safe_train)}/{len(safe_val)} harmless train/val "
        f"prompts; {n_post} post-instruction tokens {[tok.decode([t]) for t in post_ids]}")

    # 1. difference in means at every post-instruction position and layer
    candidates = (mean_activations(model, tok, harm_train, n_post, args.batch_size)
                  - mean_activations(model, tok, safe_train, n_post, args.batch_size)).float()

    # 2. score candidates; layers that the pruning rule discards anyway are not scored
    cutoff = first_pruned_layer(n_layers, args.prune_layers)
    layers = [args.layer] if args.layer is not None else list(range(cutoff))
    scores = score_candidates(model, tok, candidates, layers, harm_val, safe_val, refusal_ids, args.batch_size)

    # 3. filter and choose
    chosen, reasons = select_direction(scores, n_layers, args.kl_threshold, args.prune_layers, args.layer, args.induce_threshold)
    table = [{"position": i - n_post, "position_index": i, "token": tok.decode([post_ids[i]]), "layer": l,
              **{k: scores[k][i, l].item() for k in scores}, "discarded": reasons[(i, l)]}
             for i in range(n_post) for l in range(n_layers)]
    base_harm = C.refusal_scores(C.last_logits(model, tok, harm_val, args.batch_size), refusal_ids).mean().item()
    info = {"n_post": n_post, "n_layers": n_layers, "candidates_table": table, "chosen": chosen,
            "baseline_refusal_score_harmful_val": base_harm, "refusal_token_ids": refusal_ids,
            "data": {"harmful_train": len(harm_train), "harmful_val": len(harm_val),
                     "harmless_train": len(safe_train), "harmless_val": len(safe_val)},
            "candidates": candidates, "scores": scores, "best_per_criterion": best_per_criterion(scores, reasons)}
    if chosen is None and args.layer is not None:  # the user chose the layer: take its best position anyway
        chosen = info["chosen"] = near_miss([(i, args.layer) for i in range(n_post)],
                                            lambda c: scores["bypass"][c].item(), reasons.get)
        if chosen is not None:
            info["relaxed"] = f"no position at layer {args.layer} passes every filter: took the best near miss"
            log(f"{info['relaxed']}, position {chosen[0] - n_post} ("
                + ", ".join(f"{k} {scores[k][chosen]:.3f}" for k in scores) + ")")
    if chosen is None:
        return None, info
    return candidates[chosen], info


def main(argv=None):
    args = parse_args(argv)
    C.seed_everything(args.seed)
    t0 = time.time()
    C.check_counts(args, "n_train", "n_val", "batch_size")
    if not 0 <= args.prune_layers < 1:
        raise C.RefusalError(f"--prune-layers {args.prune_layers} must lie in [0, 1)")
    out = C.out_dir(args, "dim")
    data = load_data(args)
    model, tok = C.load_model(args.model, args.device, args.dtype)
    direction, info = compute_dim(model, tok, args, data)
    scores, n_post, chosen = info.pop("scores"), info["n_post"], info["chosen"]
    candidates = info.pop("candidates")
    png = plot_scores(scores, os.path.join(out, "dim.png"), n_post, chosen, args.kl_threshold, args.induce_threshold)
    meta = {"model": args.model, **C.provenance(args, model), **info, "seconds": round(time.time() - t0, 1)}
    if direction is None:  # keep the candidates and their scores (dim.json, dim.png), to see what failed and where
        C.save_result(out, "dim", {"candidates": candidates}, {"layer": None, **meta})
        near = {k[5:]: v for k, v in info["best_per_criterion"].items() if k.startswith("only_")}
        hint = "; ".join(f"failing only {rule}: position {c['position_index'] - n_post}, layer {c['layer']} (bypass "
                         f"{c['bypass']:.2f}, induce {c['induce']:.2f}, kl {c['kl']:.3f})" for rule, c in near.items())
        raise C.RefusalError(f"every DIM candidate was discarded by the filters (scores in {out}/dim.json)"
                             f"{'; best ' + hint if hint else ''}; rerun with --overwrite and a relaxed --kl-threshold / "
                             "--induce-threshold, or with --overwrite --layer L (that layer's best position)")
    i, layer = chosen
    s = {k: scores[k][chosen].item() for k in scores}
    meta.update(layer=layer, position=i - n_post, alpha=direction.norm().item(), selected_scores=s)
    path = C.save_result(out, "dim", {"direction": direction, "candidates": candidates}, meta)
    print(f"chose layer {layer}, position {i - n_post}: bypass {s['bypass']:.3f} (baseline "
          f"{info['baseline_refusal_score_harmful_val']:.3f}), induce {s['induce']:.3f}, kl {s['kl']:.4f}, "
          f"alpha {direction.norm():.2f}")
    print(f"wrote {path}, {out}/dim.json" + (f", {png}" if png else "") + f" in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
