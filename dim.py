"""Difference-in-means refusal direction, chosen with the direction selection of Arditi et al. (2024).

The paper's Section 2 baseline, and the starting point of RDO (its alpha, layer and training targets):
  0. filter the prompts (the authors' pipeline): keep the harmful prompts the model refuses (refusal score > 0)
     and the harmless ones it does not (< 0), train and validation alike; cut the harmless train prompts to the
     harmful count (--no-filter keeps every prompt)
  1. mean block-input activations over harmful minus harmless train prompts, at every post-instruction
     position i and every layer l:  v_i^(l) = mean_harm x_i^(l) - mean_safe x_i^(l)
  2. score each candidate v_i^(l) on validation prompts:
       bypass  mean refusal score of harmful prompts with v ablated everywhere      (lower = better)
       induce  mean refusal score of harmless prompts with v added at layer l       (must be >= 0)
       kl      KL(P_base || P_ablated) at the last position of harmless prompts     (must be <= 0.1)
  3. discard candidates in the last 20% of layers, with KL > 0.1, induce < 0 or NaN; pick the lowest bypass.
The refusal score is log p - log(1 - p), p = the probability of the refusal tokens at the last prompt position:
by default the first tokens of the model's own refusals of harmful train prompts (--refusal-tokens sets them).

Usage:
  python dim.py --model Qwen/Qwen2.5-1.5B-Instruct
  python dim.py --model ~/models/qwen --harmful harm.json --harmless safe.json --n-train 128 --n-val 32
  python dim.py --model google/gemma-2-2b-it --layer 12        # best position at a fixed layer
Writes runs/<model>/dim/dim.safetensors (tensor `direction`, raw: alpha = its norm; `candidates`, all v_i^(l))
and dim.json (layer, position, alpha, every candidate's scores, the filter's counts, the refusal tokens, flags,
versions) + dim.png with matplotlib. When every candidate is discarded it keeps the candidates, their scores and
the best near misses, and stops with an error.
"""
import argparse, math, os, time

import torch
from tqdm.auto import tqdm

import common as C

SPLITS = ("harmful_train", "harmful_val", "harmless_train", "harmless_val")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
    C.add_common_args(p, "dim")  # the whole splits: SALAD-Bench's 1184 train / 128 val, as the authors
    p.add_argument("--layer", type=int, default=None, help="only this layer: its best position, the best near "
                   "miss if none passes the filters (default: all layers)")
    p.add_argument("--kl-threshold", type=float, default=0.1, help="discard candidates whose ablation KL exceeds this")
    p.add_argument("--induce-threshold", type=float, default=0.0, help="discard candidates whose induce score is "
                   "below this")
    p.add_argument("--prune-layers", type=float, default=0.2, help="discard candidates in this last fraction of layers")
    p.add_argument("--no-filter", action="store_true", help="keep every prompt (default: only harmful prompts the "
                   "model refuses and harmless ones it does not, by refusal score)")
    return p.parse_args(argv)


def filter_data(model, tok, data, refusal_ids, batch_size):
    """Step 0 on (harm_train, harm_val, safe_train, safe_val): the kept prompts and {split: [kept, total]}."""
    kept = []
    for name, prompts in zip(SPLITS, data):
        harmful = name.startswith("harmful")
        kept.append(C.filter_prompts(model, tok, prompts, refusal_ids, harmful, batch_size))
        if not kept[-1]:
            raise C.RefusalError(f"the refusal-score filter kept none of the {len(prompts)} {name.replace('_', ' ')} "
                                 f"prompts (score {'> 0' if harmful else '< 0'}): pass --no-filter, or other "
                                 "--refusal-tokens")
    kept[2] = kept[2][:len(kept[0])]  # as many harmless as harmful train prompts
    return kept, {name: [len(k), len(x)] for name, k, x in zip(SPLITS, kept, data)}


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


def score_candidates(model, tok, candidates, layers, harm_val, safe_val, refusal_ids, batch_size):
    """bypass / induce / kl of each candidate v_i^(l) with l in `layers`, NaN elsewhere: (n_post, n_layers) each."""
    n_post, n_layers, _ = candidates.shape
    scores = {k: torch.full((n_post, n_layers), math.nan, dtype=torch.float64) for k in ("bypass", "induce", "kl")}
    base_safe = C.last_logits(model, tok, safe_val, batch_size)
    # where every prompt has the same token and no block has mixed in context yet (layer 0: embeddings), the
    # difference is zero: no direction to score
    tiny = 1e-6 * candidates.norm(dim=-1).max()
    bar = tqdm([(i, l) for i in range(n_post) for l in layers if candidates[i, l].norm() > tiny], desc="candidates")
    for i, l in bar:
        v = candidates[i, l].float().to(C.input_device(model))
        s = C.score_direction(model, tok, v, l, harm_val, safe_val, base_safe, refusal_ids, batch_size)
        for k in scores:
            scores[k][i, l] = s[k]
        bar.set_postfix(pos=i - n_post, layer=l, **{k: f"{v:.3f}" for k, v in s.items()})
    return scores


def first_pruned_layer(n_layers, prune_layers):
    """Layers from here on are in the last `prune_layers` of the model, counted as the authors' code does."""
    return int(n_layers * (1 - prune_layers))


def candidate_table(scores, layer=None, kl_threshold=0.1, induce_threshold=0.0, prune_layers=0.2, tokens=None):
    """One row per candidate: position, layer, scores and why the filters discard it (empty: kept). A pinned
    `layer` is the user's choice, so the layer-pruning rule does not apply to it."""
    n_post, n_layers = scores["bypass"].shape
    cutoff = first_pruned_layer(n_layers, prune_layers) if layer is None else n_layers
    rows = []
    for i in range(n_post):
        for l in range(n_layers):
            s = {k: scores[k][i, l].item() for k in scores}
            why = [f"layer in last {prune_layers:.0%}"] * (l >= cutoff)
            rows.append({"position": i - n_post, "position_index": i, "token": tokens[i] if tokens else None,
                         "layer": l, **s, "discarded": why + C.discard_reasons(s, kl_threshold, induce_threshold)})
    return rows


def select_direction(table, layer=None):
    """The kept candidate with the lowest bypass score, else None. At a pinned layer, its best near miss instead."""
    pool = table if layer is None else [r for r in table if r["layer"] == layer]
    best = C.lowest_bypass(pool)
    return best if best is not None and (layer is not None or not best["discarded"]) else None


def best_per_criterion(table):
    """What to say when every candidate is discarded: the best candidate by each score, and the lowest-bypass
    one among those that fail a single rule (e.g. 'only_kl>0.1': it passes everything but the KL filter)."""
    scored = [r for r in table if "nan/not scored" not in r["discarded"]]
    if not scored:
        return {}
    best = {k: f(scored, key=lambda r: r[k]) for k, f in (("bypass", min), ("kl", min), ("induce", max))}
    for rule in sorted({w for r in scored for w in r["discarded"]}):
        near = [r for r in scored if r["discarded"] == [rule]]
        if near:
            best[f"only_{rule}"] = min(near, key=lambda r: r["bypass"])
    return best


def plot(path, scores, chosen, args):
    """dim.png: each score against the layer, a line per position, the filters' thresholds and the choice."""
    n_post, n_layers = scores["bypass"].shape
    panels = []
    for key, threshold in (("bypass", None), ("induce", args.induce_threshold), ("kl", args.kl_threshold)):
        series = {f"pos {i - n_post}": (range(n_layers), scores[key][i].tolist()) for i in range(n_post)}
        if threshold is not None:
            series["threshold"] = ([0, n_layers - 1], [threshold, threshold])
        if chosen:
            series["chosen"] = ([chosen["layer"]], [chosen[key]])
        panels.append(("line", series, {"title": key, "xlabel": "layer", **({"yscale": "log"} if key == "kl" else {})}))
    return C.plot_panels(path, panels)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    C.check_counts(args, "n_train", "n_val", "batch_size")
    if not 0 <= args.prune_layers < 1:
        raise C.RefusalError(f"--prune-layers {args.prune_layers} must lie in [0, 1)")
    out = C.out_dir(args, "dim")
    data = C.load_data(args)  # before the model loads: a bad file fails fast
    model, tok = C.load_model(args.model, args.device, args.dtype)
    if args.layer is not None:
        C.check_layer(model, args.layer)
    refusal_ids, refusal_info = C.refusal_tokens(model, tok, data[0], args.refusal_tokens, batch_size=args.batch_size)
    filtered = None
    if not args.no_filter:  # step 0
        data, filtered = filter_data(model, tok, data, refusal_ids, args.batch_size)
    harm_train, harm_val, safe_train, safe_val = data
    post_ids = C.post_instruction_ids(tok)
    n_post, n_layers = len(post_ids), len(C.decoder_layers(model))
    print(f"data: {len(harm_train)}/{len(harm_val)} harmful and {len(safe_train)}/{len(safe_val)} harmless train/val "
          f"prompts; {n_post} post-instruction tokens {[tok.decode([t]) for t in post_ids]}")

    # step 1: difference in means at every post-instruction position and layer
    candidates = (mean_activations(model, tok, harm_train, n_post, args.batch_size)
                  - mean_activations(model, tok, safe_train, n_post, args.batch_size)).float()
    # step 2: score the candidates; layers that the pruning rule discards anyway are not scored
    layers = [args.layer] if args.layer is not None else range(first_pruned_layer(n_layers, args.prune_layers))
    scores = score_candidates(model, tok, candidates, layers, harm_val, safe_val, refusal_ids, args.batch_size)
    # step 3: filter and choose
    table = candidate_table(scores, args.layer, args.kl_threshold, args.induce_threshold, args.prune_layers,
                            [tok.decode([t]) for t in post_ids])
    chosen = select_direction(table, args.layer)

    base_harm = C.refusal_scores(C.last_logits(model, tok, harm_val, args.batch_size), refusal_ids).mean().item()
    meta = {**C.provenance(args, model), "n_post": n_post, "n_layers": n_layers, "refusal_tokens": refusal_info,
            "refusal_token_ids": refusal_ids, "filtered": filtered, "data": dict(zip(SPLITS, map(len, data))),
            "baseline_refusal_score_harmful_val": base_harm, "candidates_table": table,
            "best_per_criterion": best_per_criterion(table), "seconds": round(time.time() - t0, 1)}
    png = plot(os.path.join(out, "dim.png"), scores, chosen, args)
    if chosen is None:  # keep the candidates and their scores, to see what failed and where
        C.save_result(out, "dim", {"candidates": candidates}, {"layer": None, **meta})
        near = {k[5:]: r for k, r in meta["best_per_criterion"].items() if k.startswith("only_")}
        hint = "; ".join(f"failing only {rule}: position {r['position']}, layer {r['layer']} (bypass {r['bypass']:.2f}"
                         f", induce {r['induce']:.2f}, kl {r['kl']:.3f})" for rule, r in near.items())
        raise C.RefusalError(f"every DIM candidate was discarded by the filters (scores in {out}/dim.json)"
                             f"{'; best ' + hint if hint else ''}; rerun with --overwrite and a relaxed --kl-threshold"
                             " / --induce-threshold, or with --overwrite --layer L (that layer's best position)")
    if chosen["discarded"]:  # the user chose the layer: its best position anyway
        meta["relaxed"] = f"no position at layer {args.layer} passes every filter: took the best near miss"
        print(f"{meta['relaxed']} (fails {', '.join(chosen['discarded'])})")
    i, layer = chosen["position_index"], chosen["layer"]
    direction = candidates[i, layer]
    s = {k: chosen[k] for k in ("bypass", "induce", "kl")}
    meta.update(layer=layer, position=i - n_post, chosen=[i, layer], alpha=direction.norm().item(), selected_scores=s)
    path = C.save_result(out, "dim", {"direction": direction, "candidates": candidates}, meta)
    print(f"chose layer {layer}, position {i - n_post}: bypass {s['bypass']:.3f} (baseline {base_harm:.3f}), "
          f"induce {s['induce']:.3f}, kl {s['kl']:.4f}, alpha {direction.norm():.2f}")
    print(f"wrote {path}, {out}/dim.json" + (f", {png}" if png else "") + f" in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
