"""Refusal Direction Optimization: Algorithm 1 of the paper (Section 4, Appendix A).

A unit direction r is trained by gradient descent so that
  ablating r everywhere makes the model answer harmful prompts      L_abl = CE(f_ablate(r)(p_harm), t_answer)
  adding alpha * r_hat at layer l makes it refuse harmless ones     L_add = CE(f_add(alpha r_hat, l)(p_safe), t_refusal)
  ablating r leaves harmless answers as they were                   L_ret = KL(f(p_safe + t_retain) || f_ablate(r)(...))
  L = 1.0 L_abl + 0.2 L_add + 1.0 L_ret,  AdamW (lr 0.01, betas 0.9/0.98), effective batch 16,
  gradient projected onto the sphere's tangent, r renormalised after every step, lr / 10 on a 5-step plateau
  (at most twice, then stop), one epoch at most; the final r is chosen among the last 20 steps' iterates
  with the DIM selection scores on validation prompts.
The targets come from the DIM direction (dim.py): t_answer = 30 greedy tokens with DIM ablated, t_refusal =
greedy tokens with DIM added (cut after the first sentence), t_retain = 29 greedy tokens, no intervention.

Usage:
  python rdo.py --model google/gemma-2-2b-it --layer 12             # computes DIM at layer 12 itself
  python rdo.py --model Qwen/Qwen2.5-1.5B-Instruct --dim runs/Qwen2.5-1.5B-Instruct/dim/dim.safetensors
  python rdo.py ... --orthogonal-to runs/.../dim/dim.safetensors --out runs/x/rdo_perp   # RDO-perp
  python rdo.py ... --resume                                       # after Ctrl-C or a crash
  python rdo.py ... --init dim                                     # start from the DIM direction, not at random
  python rdo.py ... --sign-warmup 4      # not in the paper: 4 steps without the addition loss, then r's sign (README)
  python rdo.py ... --judge-refusals     # not in the paper: refusal targets that are refusals (README)
  python rdo.py ... --lambda-ret 30 --amsgrad --max-grad-norm 10   # the authors' code's settings (README)
Writes DIR/rdo.safetensors (tensor `direction`, unit norm; `iterates`, every step's r, to choose again with other
thresholds) and DIR/rdo.json (layer, alpha, loss history, the chosen step and its scores, flags, versions);
DIR/rdo_checkpoint.pt while training. The targets, and the clean retain pass's states (computed once, not in every
step), are cached under runs/<model-name>/targets/ (--cache).
"""
import argparse, itertools, json, math, os, time
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

import common as C
import dim


def training_parser(doc, method):
    """The flags of Algorithm 1, shared by every script that trains directions (rdo.py, rco.py, repind.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=C.HelpFormatter)
    C.add_common_args(p, method, n_train=1184)
    a = p.add_argument
    a("--dim", default=None, help="dim.safetensors from dim.py (default: compute DIM here, at --layer if given)")
    a("--layer", type=int, default=None, help="addition layer (default: the DIM layer)")
    a("--alpha", type=float, default=None, help="addition strength (default: the DIM direction's norm)")
    a("--lr", type=float, default=0.01, help="AdamW learning rate")
    a("--betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas")
    a("--amsgrad", action="store_true", help="AdamW's amsgrad variant (the authors' code uses it; the paper's text "
      "says AdamW)")
    a("--max-grad-norm", type=float, default=None, help="clip the tangent gradient to this norm before each step "
      "(the authors' code clips at 10; the paper's text does not clip)")
    a("--effective-batch", type=int, default=16, help="examples per optimizer step")
    a("--micro-batch", type=int, default=None,
      help="examples per forward pass; the loss does not depend on it (default: 16 on a GPU; 2 on a CPU, where "
           "larger is barely faster and needs more memory: bench/rdo_step.py)")
    a("--epochs", type=int, default=1, help="passes over the training pairs at most")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: --epochs passes)")
    a("--lambda-abl", type=float, default=1.0, help="weight of the ablation loss (answer harmful prompts)")
    a("--lambda-add", type=float, default=0.2, help="weight of the addition loss (refuse harmless prompts)")
    a("--lambda-ret", type=float, default=1.0, help="weight of the retain loss (KL on harmless answers, averaged over "
      "its 30 positions as in the paper's text; the paper's code sums them: its 1 is about 30 here)")
    a("--answer-tokens", type=int, default=30, help="length of t_answer (DIM ablated, harmful prompts)")
    a("--retain-tokens", type=int, default=29, help="length of t_retain (no intervention, harmless prompts)")
    a("--refusal-tokens", type=int, default=32, help="t_refusal (DIM added, harmless prompts): at most this many tokens, cut after the first sentence")
    a("--judge-refusals", action="store_true", help="not in the paper: train the addition loss on refusals only: "
      "each t_refusal that the substring judge calls an answer is replaced by another prompt's refusal (where DIM's "
      "addition answers instead of refusing, the paper's loss trains r to answer too: about 40%% of them on "
      "Qwen2.5-0.5B; README)")
    a("--patience", type=int, default=5, help="steps without improvement before lr / 10 (the paper's 5; each step's "
      "loss is one batch's, so an easy batch can drop the lr early: on Qwen2.5-0.5B, seed 0, 10 gave a better direction; README)")
    a("--lr-drops", type=int, default=2, help="lr reductions before the next plateau stops training")
    a("--select-last", type=int, default=20, help="choose the final direction among this many last iterates")
    a("--kl-threshold", type=float, default=0.1, help="selection: discard iterates whose ablation KL exceeds this")
    a("--induce-threshold", type=float, default=0.0, help="selection: discard iterates whose induce score is below this")
    a("--resume", action="store_true", help=f"continue from DIR/{method}_checkpoint.pt")
    a("--cache", default=None, help="targets cache folder (default: runs/<model-name>/targets)")
    return p


def parse_args(argv=None):
    p = training_parser(__doc__, "rdo")
    p.add_argument("--orthogonal-to", nargs="+", default=[], metavar="FILE",
                   help="RDO-perp: stay orthogonal to these directions")
    p.add_argument("--init", default=None, metavar="FILE", help="start from this direction (a .safetensors file, or "
                   "'dim' for the DIM direction) instead of a random one, as the paper does; the seed still draws the "
                   "batches (on Qwen2.5-0.5B the random start decided which optimum RDO reached: README)")
    p.add_argument("--sign-warmup", type=int, default=0, metavar="K", help="not in the paper: the first K steps "
                   "without the addition loss (the other two are even in r, so its sign is free), then r takes the "
                   "sign whose addition loss is lower on that step's batch (0: the paper's loop)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- DIM: alpha, layer, targets

def get_dim(model, tok, args, out, data):
    """(DIM direction, its layer) from --dim, or computed here with dim.py's code (saved beside our output)."""
    if args.dim:
        vec, meta = C.load_direction(args.dim, model)
        if meta.get("layer") is None:
            raise C.RefusalError(f"{args.dim} has no layer in its sidecar {os.path.splitext(args.dim)[0]}.json")
        return vec, meta["layer"]
    saved = os.path.join(out, "dim.safetensors")
    if args.resume and os.path.isfile(saved):  # computed by the run we are resuming
        vec, meta = C.load_direction(saved, model)
        return vec, meta["layer"]
    if os.path.isfile(saved) and not args.overwrite:
        raise C.RefusalError(f"'{out}' already holds a DIM result: pass --dim {saved} to use it, --overwrite to "
                             "compute it again, or --out elsewhere")
    # dim.py's defaults (our --kl-threshold and --induce-threshold choose among RDO's iterates, not DIM's
    # candidates) and its data: the first dim.N_TRAIN of our training pairs, for the same seed the prompts dim.py
    # takes. So `rdo.py --layer L` starts from the direction that `dim.py --layer L` finds.
    harm, harm_val, safe, safe_val = data
    n = min(args.n_train, dim.N_TRAIN)
    defaults = dim.parse_args(["--model", args.model])
    dim_args = SimpleNamespace(**{**vars(args), "n_train": n, **{k: getattr(defaults, k) for k in (
        "kl_threshold", "induce_threshold", "prune_layers", "filter_prompts")}})
    vec, info = dim.compute_dim(model, tok, dim_args, (harm[:n], harm_val, safe[:n], safe_val))
    if vec is None:
        raise C.RefusalError("no DIM candidate passed the filters; run dim.py (see its message) and pass --dim, "
                             "or pass --layer")
    i, layer = info["chosen"]
    scores, _ = info.pop("scores"), info.pop("candidates")  # as dim.py's sidecar: the data sizes and chosen scores
    path = C.save_result(out, "dim", {"direction": vec}, {
        "model": args.model, **C.provenance(dim_args, model), **info, "layer": layer, "position": i - info["n_post"],
        "alpha": vec.norm().item(), "selected_scores": {k: scores[k][i, layer].item() for k in scores}})
    print(f"computed the DIM direction at layer {layer}, position {i - info['n_post']}: saved to {path}")
    return vec, layer


def cut_first_sentence(tok, ids):
    """Refusal targets end with their first sentence ("I'm sorry, but I can't help with that.")."""
    for k in range(1, len(ids) + 1):
        if any(c in tok.decode(ids[k - 1:k]) for c in ".!?\n") and tok.decode(ids[:k]).strip():
            return ids[:k]
    return ids


def cache_folder(args):
    return args.cache or C.model_dir(args.model, "targets")


def get_targets(model, tok, harm, safe, dim_vec, layer, args):
    """t_answer, t_refusal, t_retain as token ids; cached under a key of everything they depend on."""
    key = C.json_hash([args.model, harm, safe, args.answer_tokens, args.refusal_tokens, args.retain_tokens, layer,
                       C.tensor_hash(dim_vec), str(model.dtype), sorted(C.GREEDY.items())])  # (how they decode)
    folder = cache_folder(args)
    path = os.path.join(folder, f"targets_{key}.json")
    if os.path.isfile(path):
        print(f"targets from cache {path}")
        return json.load(open(path))
    bs = args.batch_size
    with C.directional_ablation(model, dim_vec):
        answer = C.generate_ids(model, tok, harm, args.answer_tokens, bs, desc="t_answer (DIM ablated)")
    with C.activation_addition(model, dim_vec, layer):
        refusal = C.generate_ids(model, tok, safe, args.refusal_tokens, bs, desc="t_refusal (DIM added)")
    retain = C.generate_ids(model, tok, safe, args.retain_tokens, bs, desc="t_retain")
    targets = {"answer": answer, "refusal": [cut_first_sentence(tok, t) for t in refusal], "retain": retain}
    os.makedirs(folder, exist_ok=True)
    C.save_json(path, targets)
    print(f"targets cached in {path}")
    return targets


def judged_refusals(tok, refusal):
    """--judge-refusals: the t_refusal targets, each answer among them (by the substring judge) replaced by a refusal
    target: the first answer by the first refusal, the second by the second, and so on, round again if need be
    (refusals barely depend on the prompt; answers do). An empty target (the end of text at once) counts as an
    answer here, not a refusal to copy. Returns the targets and how many were replaced."""
    texts = [tok.decode(t, skip_special_tokens=True) for t in refusal]
    judged = [bool(text.strip()) and C.is_refusal(text) for text in texts]
    donors = [t for t, ok in zip(refusal, judged) if ok]
    if not donors:
        raise C.RefusalError("--judge-refusals: DIM's addition made no harmless training prompt refuse, so there is "
                             "no refusal target to train on: run without the flag")
    turn = itertools.count()
    return [t if ok else donors[next(turn) % len(donors)] for t, ok in zip(refusal, judged)], judged.count(False)


@torch.no_grad()
def clean_states(model, tok, safe, retain, micro_batch):
    """Line 5's clean pass f(p_safe + t_retain) for every pair, once: it does not depend on r, so no step needs to
    run it again. Kept per pair: the LM head's input at the KL's positions (the last template token and the retain
    tokens), (len(t_retain) + 1, d); the logits themselves would take vocabulary / d times more (170x for
    Qwen2.5-0.5B, 111x for Gemma-2-2B). None where the model's logits are not unembed() of that input (a model
    that scales them): the steps then run the clean pass."""
    seen, out = [], [None] * len(safe)
    prefix = shared_prefix(tok, safe, retain, model)
    kv = None if prefix is None else prefix_kv(model, prefix)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, _: seen.append(args[0]))
    try:
        batches = micro_batches(tok, safe, retain, micro_batch, model, prefix)
        for j, (idx, b) in enumerate(tqdm(batches, total=math.ceil(len(safe) / micro_batch), desc="clean retain states")):
            b["kv"] = kv
            logits = window_logits(model, b, int(b["n_target"].max()) + 1)
            h = seen.pop()
            if j == 0 and not torch.allclose(unembed(model, h).float().to(logits.device), logits.float(),
                                             rtol=1e-2, atol=1e-2):
                print("this model's logits are not its LM head's output (a scale?): the clean retain pass runs in every step")
                return None
            for row, i in enumerate(idx):
                out[i] = h[row, h.shape[1] - len(retain[i]) - 1:].clone()
    finally:
        handle.remove()
    return out


def get_clean_states(model, tok, safe, retain, args, micro_batch):
    """clean_states, cached beside the targets under a key of what they depend on (not the DIM direction: RDO at
    another layer, from another DIM, reuses them where its retain targets are the same)."""
    from safetensors.torch import load_file, save_file
    key = C.json_hash([args.model, safe, retain, str(model.dtype)])
    folder = cache_folder(args)
    path = os.path.join(folder, f"clean_{key}.safetensors")
    head = model.get_output_embeddings().weight.device  # where clean_states leaves them
    if os.path.isfile(path):
        print(f"clean retain states from cache {path}")
        return list(load_file(path)["h"].to(head).split([len(t) + 1 for t in retain]))
    states = clean_states(model, tok, safe, retain, micro_batch)
    if states is not None:
        os.makedirs(folder, exist_ok=True)
        C.atomic_write(path, lambda tmp: save_file({"h": torch.cat(states).cpu()}, tmp))
        print(f"clean retain states cached in {path}")
    return states


# ----------------------------------------------------------------------------- the losses (COMPUTELOSS)

def pack(tok, prompts, targets, device, skip=0):
    """Prompt and target joined as token ids (re-tokenizing the joined text would shift the boundary), left-padded;
    without the first `skip` tokens (a prefix shared by every prompt, run once: see loss_and_grad)."""
    rows = [tok(t, add_special_tokens=False)["input_ids"][skip:] + list(y) for t, y in zip(C.format_chat(tok, prompts), targets)]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask, "n_target": torch.tensor([len(y) for y in targets], device=device)}


def micro_batches(tok, prompts, targets, micro_batch, model, prefix=None):
    """(indices, packed rows) over micro-batches of the examples sorted by length (less padding), each row without
    the shared prefix's tokens if there is one."""
    size = lambda i: len(tok(prompts[i], add_special_tokens=False)["input_ids"]) + len(targets[i])
    order = sorted(range(len(prompts)), key=size)
    for j in range(0, len(order), micro_batch):
        idx = order[j:j + micro_batch]
        yield idx, pack(tok, [prompts[i] for i in idx], [targets[i] for i in idx], C.input_device(model),
                        0 if prefix is None else prefix.shape[1])


def prefix_kv(model, ids):
    """Per-layer (keys, values) of a token prefix ids (1, P), run under whatever hooks are active; differentiable."""
    return [(layer.keys, layer.values) for layer in C.run_into_cache(model, ids).layers]


def forward_after(model, kv, batch, **kw):
    """forward() for left-padded rows that all continue the prefix whose prefix_kv is kv: the prefix is computed
    once, not once per row. A fresh cache per call (the model appends to it), holding views of kv."""
    from transformers import DynamicCache
    n, p = batch["input_ids"].shape[0], kv[0][0].shape[2]
    cache = DynamicCache(config=model.config)
    for l, (k, v) in enumerate(kv):
        cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), l)
    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=torch.cat([mask.new_ones(n, p), mask], 1),
                 position_ids=p + C.position_ids(mask), **{C.cache_kwarg(model): cache}, **kw)


def window_logits(model, batch, k, kv="kv"):
    """Logits of the last k positions only: the vocabulary is 150k-256k, the targets are ~30 tokens. The rows
    continue the shared prefix whose keys and values are batch[kv], when there is one."""
    if batch.get(kv) is None:
        return C.forward(model, batch, logits_to_keep=k).logits
    return forward_after(model, batch[kv], batch, logits_to_keep=k).logits


# Devices where the shared prefix runs once: a CPU pays per token (1.25x on Qwen-0.5B, a third of its tokens
# saved). On a GPU the one-row prefix pass, its backward and the copies of its keys and values into every row's
# cache cost more than the tokens they save, at every size timed (not profiled). On an H100 in bf16
# (bench/rdo_step.py, micro-batch 16, median of 10) the step took 0.43 s with it and 0.33 s without in Qwen-0.5B's
# shape, 0.67 / 0.43 in Gemma-2-2B's, 0.58 / 0.40 in Qwen-7B's.
SHARE_PREFIX = {"cpu"}


def shared_prefix(tok, prompts, targets, model):
    """Token ids that every chat-formatted prompt starts with (system prompt, user header: 24 of Qwen's ~75
    tokens per example), leaving each row at least one token. None on devices not in SHARE_PREFIX, and where a
    sliding window (Gemma) could reach back past the prefix: the cached path counts the padding between prefix and
    row inside the window."""
    if C.input_device(model).type not in SHARE_PREFIX:
        return None
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in C.format_chat(tok, prompts)]
    p = 0
    while all(len(x) > p + 1 and x[p] == ids[0][p] for x in ids):
        p += 1
    window = getattr(C.text_config(model), "sliding_window", None)
    if p == 0 or (window and p + max(len(x) + len(y) for x, y in zip(ids, targets)) > window):
        return None
    return torch.tensor([ids[0][:p]], device=C.input_device(model))


def ce_per_example(logits, batch):
    """Mean CE over each row's target tokens; logits cover the last k positions (k = max target + 1)."""
    k = logits.shape[1]
    labels = batch["input_ids"][:, -(k - 1):]
    is_target = torch.arange(k - 1, device=labels.device) >= (k - 1 - batch["n_target"])[:, None]
    ce = C.token_ce(logits[:, :-1].flatten(0, 1), labels.flatten()).view(labels.shape)  # (rows x positions, vocab)
    return (ce * is_target).sum(1) / is_target.sum(1)


def kl_per_example(clean_logits, logits, batch):
    """Mean over the retain tokens and the last template token of KL(P_clean || P_ablated), per row."""
    k = logits.shape[1]
    used = torch.arange(k, device=logits.device) >= (k - 1 - batch["n_target"])[:, None]
    logp = C.at_least_fp32(clean_logits.to(logits.device)).log_softmax(-1)  # (--device multi: the head's GPU)
    logq = C.at_least_fp32(logits).log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (kl * used).sum(1) / used.sum(1)


def ablation_loss(model, r, b):
    """Line 3 of COMPUTELOSS, per example: CE(f_ablate(r)(p_harm), t_answer)."""
    with C.directional_ablation(model, r):
        return ce_per_example(window_logits(model, b, int(b["n_target"].max()) + 1), b)


def addition_loss(model, r, b, alpha, layer):
    """Line 4, per example: CE(f_add(alpha r_hat, l)(p_safe), t_refusal)."""
    with C.activation_addition(model, alpha * r / r.norm(dim=-1, keepdim=True), layer):
        return ce_per_example(window_logits(model, b, int(b["n_target"].max()) + 1), b)


def unembed(model, h):
    """Logits from what the LM head sees, as the model makes them (Gemma-2 caps its logits)."""
    head = model.get_output_embeddings()
    logits = head(h.to(head.weight.device))  # (--device multi: the head may sit on another GPU)
    cap = getattr(C.text_config(model), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def retain_loss(model, r, b):
    """Line 5, per example: KL(f(p_safe + t_retain) || f_ablate(r)(p_safe + t_retain)). The clean side comes from
    b["clean_h"], the rows' clean_states, through the LM head alone, or else from a clean pass without autograd:
    no gradient flows back through it."""
    k = int(b["n_target"].max()) + 1
    with torch.no_grad():
        if b.get("clean_h") is None:
            clean = window_logits(model, b, k, kv="clean_kv")
        else:  # each row's states end at its last position, as its tokens do (left padding)
            h = b["clean_h"][0].new_zeros(len(b["clean_h"]), k, b["clean_h"][0].shape[-1])
            for row, x in zip(h, b["clean_h"]):
                row[k - len(x):] = x
            clean = unembed(model, h)
    with C.directional_ablation(model, r):
        return kl_per_example(clean, window_logits(model, b, k), b)


def loss_and_grad(model, tok, r, batch, alpha, layer, lambdas, micro_batch):
    """COMPUTELOSS (line 6: L = sum of lambda * loss) over a batch of (p_harm, p_safe, t_answer, t_refusal, t_retain),
    each with its clean_states as a sixth element where they were computed, leaving dL/dr in r.grad. Returns L and
    its unweighted parts as floats. r is one direction (d,) for the whole batch, or one per example (n, d) (rco.py
    trains many directions at once this way).

    Each loss is a mean over examples, so each runs over its own micro-batches of examples sorted by length:
    less padding, and the result does not depend on micro_batch. Backward after every micro-batch bounds memory.
    On a CPU (SHARE_PREFIX) the template's prefix that every prompt shares runs once under each intervention (the
    ablation and retain losses share theirs); the rows continue from its keys and values (leaves of their own),
    whose gradients go back through the prefix pass at the end.
    """
    n = len(batch)
    harm, safe, answer, refusal, retain, *states = zip(*batch)
    states = states[0] if states else None  # clean retain states (clean_states), or a clean pass here
    losses = {"abl": lambda b, r: ablation_loss(model, r, b), "add": lambda b, r: addition_loss(model, r, b, alpha, layer),
              "ret": lambda b, r: retain_loss(model, r, b)}
    # the prefix runs under the same intervention as its loss's rows (the loss functions above apply them to those)
    intervention = {"abl": "ablate", "ret": "ablate", "add": "add"}
    hooks = {"ablate": lambda: C.directional_ablation(model, r),
             "add": lambda: C.activation_addition(model, alpha * r / r.norm(), layer)}
    sums, prefixes = {}, {}  # (intervention, prefix ids) -> (prefix kv, its leaves)
    for key, prompts, targets in (("abl", harm, answer), ("add", safe, refusal), ("ret", safe, retain)):
        prefix = shared_prefix(tok, prompts, targets, model) if r.dim() == 1 else None  # one direction per row: no sharing
        leaves = clean_kv = None
        if prefix is not None:
            which = (intervention[key], tuple(prefix[0].tolist()))
            if which not in prefixes:  # the retain loss reuses the ablation loss's prefix (same tokens, same hooks)
                with hooks[which[0]]():
                    kv = prefix_kv(model, prefix)
                prefixes[which] = kv, [tuple(t.detach().requires_grad_(t.requires_grad) for t in pair) for pair in kv]
            leaves = prefixes[which][1]
            if key == "ret" and states is None:
                with torch.no_grad():
                    clean_kv = prefix_kv(model, prefix)
        sums[key] = 0.0
        for idx, b in micro_batches(tok, prompts, targets, micro_batch, model, prefix):
            b["kv"], b["clean_kv"] = leaves, clean_kv
            if key == "ret" and states is not None:
                b["clean_h"] = [states[i] for i in idx]
            with torch.set_grad_enabled(lambdas[key] != 0):  # a loss weighted 0 is only reported: no backward
                per_example = losses[key](b, r if r.dim() == 1 else r[idx].unsqueeze(1))
            if lambdas[key]:
                (lambdas[key] * per_example.sum() / n).backward()
            sums[key] += per_example.sum().item() / n
    for kv, leaves in prefixes.values():  # the rows' gradients w.r.t. the prefix's keys/values, back through it
        grads = [(t, leaf.grad) for pair, lp in zip(kv, leaves) for t, leaf in zip(pair, lp) if leaf.grad is not None]
        if grads:
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
    sums["loss"] = sum(lambdas[key] * sums[key] for key in lambdas)
    return sums


# ----------------------------------------------------------------------------- optimisation

def tangent(grad, r):
    """The gradient's component tangent to the unit sphere at r (row by row for a basis): moving along it keeps
    |r| to first order."""
    return grad - (grad * r).sum(-1, keepdim=True) * r


def check_finite(loss, grad, where, ckpt_path):
    """Stop on a NaN or infinite loss or gradient, before the step carries it into r and the checkpoint."""
    bad = None if math.isfinite(loss) else f"loss is {loss}"
    if bad is None and not torch.isfinite(grad).all():
        bad = f"the gradient is not finite (loss {loss:.4f})"
    if bad:
        saved = f"the last good state is in {ckpt_path}" if os.path.isfile(ckpt_path) else "nothing was saved yet"
        raise C.RefusalError(f"{bad} at {where}: stopped; {saved} (lower --lr, or use --dtype float32)")


def make_optimizer(param, args):
    """AdamW without weight decay (r lives on the sphere; decay would only shrink it before the renormalisation)."""
    return torch.optim.AdamW([param], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0, amsgrad=args.amsgrad)


def sphere_step(opt, p, max_norm=None):
    """Algorithm 1, line 5: an optimizer step along the sphere's tangent at p (row by row for a basis), the
    gradient clipped to max_norm first if given. Returns the tangent gradient's norm before clipping."""
    p.grad = tangent(p.grad, p)
    norm = p.grad.norm().item()
    if max_norm is not None and norm > max_norm:
        p.grad *= max_norm / norm
    opt.step()
    return norm


def project_out(r, basis):
    """RDO-perp: remove the span of `basis` (orthonormal rows) from r."""
    return r if basis is None else r - (r @ basis.T) @ basis


def initial_direction(args, model, dim_vec, basis, g):
    """Algorithm 1, line 1: r on the unit sphere, random (the paper) or --init; orthogonal to `basis` for RDO-perp.
    The random draw happens either way, so that a seed gives the same batches with and without --init."""
    d = C.hidden_size(model)
    r = torch.randn(d, generator=g).to(C.input_device(model))
    if args.init:
        vecs = (dim_vec if args.init == "dim" else C.load_direction(args.init, model)[0]).reshape(-1, d)
        if len(vecs) != 1:
            raise C.RefusalError(f"--init {args.init} holds {len(vecs)} directions; rdo.py starts from one")
        r = vecs[0].to(r)
        r = r / r.norm()
    r = project_out(r, basis)
    if r.norm() < 1e-3:
        raise C.RefusalError(f"--init {args.init} lies in the span of --orthogonal-to: nothing is left to start from")
    return r / r.norm()


@torch.no_grad()
def choose_sign(model, tok, r, opt, batch, alpha, layer, micro_batch):
    """After --sign-warmup steps without the addition loss: the ablation and retain losses are even in r, so the
    warm-up may have reached either of two mirror images; keep the one whose addition loss is lower on this batch.
    Adam's first moment flips with r (its second does not change), so the steps after a flip are mirrored too.
    Returns whether r flipped."""
    rows = list(micro_batches(tok, [x[1] for x in batch], [x[3] for x in batch], micro_batch, model))
    mean_loss = lambda v: sum(addition_loss(model, v, b, alpha, layer).sum().item() for _, b in rows) / len(batch)
    flip = mean_loss(-r) < mean_loss(r)
    if flip:
        r.neg_()
        opt.state[r]["exp_avg"].neg_()
    return flip


def plateau_step(state, loss, patience, max_drops):
    """lr / 10 after `patience` steps without a new best loss, at most `max_drops` times; then stop.

    Returns 'keep', 'drop' or 'stop'; `state` (best, bad, drops) is a dict so that it checkpoints as is.
    """
    if loss < state["best"]:
        state["best"], state["bad"] = loss, 0
        return "keep"
    state["bad"] += 1
    if state["bad"] < patience:
        return "keep"
    state["bad"] = 0
    if state["drops"] >= max_drops:
        return "stop"
    state["drops"] += 1
    return "drop"


def record_step(opt, state, sums, r, args):
    """After an optimizer step: the plateau schedule (lr / 10, or stop), the loss history and the iterate."""
    action = plateau_step(state["plateau"], sums["loss"], args.patience, args.lr_drops)
    if action == "drop":
        for group in opt.param_groups:
            group["lr"] /= 10
    state["done"] = action == "stop"
    state["history"].append({"step": state["step"], "lr": opt.param_groups[0]["lr"], **sums})
    state["iterates"].append(r.detach().cpu().clone())
    state["step"] += 1


def new_state():
    return {"step": 0, "plateau": {"best": math.inf, "bad": 0, "drops": 0}, "history": [], "iterates": [], "done": False}


def select_iterate(model, tok, iterates, alpha, layer, harm_val, safe_val, args):
    """Arditi et al.'s selection over the last --select-last of a run's iterates (step i's r at index i):
    KL <= threshold and induce >= 0, then lowest bypass."""
    refusal_ids = C.refusal_token_ids(tok)
    base_safe = C.last_logits(model, tok, safe_val, args.batch_size)
    scored = []
    for step in tqdm(range(len(iterates))[-args.select_last:], desc="selection"):
        r = iterates[step].to(C.input_device(model))
        s = dim.score_direction(model, tok, alpha * r, layer, harm_val, safe_val, base_safe, refusal_ids, args.batch_size)
        scored.append({"step": step, **s, "discarded": dim.discard_reasons(s, args.kl_threshold, args.induce_threshold)})
    kept = [s for s in scored if not s["discarded"]]
    if kept:
        return min(kept, key=lambda s: s["bypass"]), scored
    best = dim.near_miss(scored, lambda s: s["bypass"], lambda s: s["discarded"])  # the same fallback as dim.py
    if best is None:
        raise C.RefusalError("every iterate scored NaN in the selection: the training diverged; lower --lr")
    print(f"no iterate passes every selection filter; taking the best near miss (step {best['step']}: {best['discarded']})")
    return best, scored


def checkpoint_path(out, method):
    return os.path.join(out, f"{method}_checkpoint.pt")


def setup(args, method):
    """What every training script (rdo.py, rco.py, repind.py) does before its loop: output folder and checkpoint
    path (refusing to clobber a result or an unfinished run), data, model, the DIM direction, layer, alpha and
    targets. Returns a namespace."""
    C.seed_everything(args.seed)
    C.check_counts(args, "n_train", "n_val", "batch_size", "effective_batch", "micro_batch", "epochs", "max_steps",
                   "answer_tokens", "retain_tokens", "refusal_tokens", "patience", "select_last")
    C.check_counts(args, "lr_drops", minimum=0)
    out = args.out or C.model_dir(args.model, method)
    ckpt_path = checkpoint_path(out, method)
    if not args.resume:
        if os.path.isfile(ckpt_path) and not args.overwrite:
            raise C.RefusalError(f"{ckpt_path} holds an unfinished run: pass --resume to continue it, or --overwrite")
        out = C.out_dir(args, method)
    elif not os.path.isfile(ckpt_path):
        raise C.RefusalError(f"--resume: no checkpoint at {ckpt_path}")
    data = dim.load_data(args)
    harm, harm_val, safe, safe_val = data
    n = min(len(harm), len(safe))
    model, tok = C.load_model(args.model, args.device, args.dtype)
    device = C.input_device(model)
    dim_vec, dim_layer = get_dim(model, tok, args, out, data)
    layer = C.check_layer(model, dim_layer if args.layer is None else args.layer)
    basis = None
    if getattr(args, "orthogonal_to", None):
        basis = C.unit_basis(torch.cat([C.load_direction(f, model)[0].reshape(-1, C.hidden_size(model))
                                         for f in args.orthogonal_to])).to(device)
    steps_per_epoch = n // args.effective_batch
    if steps_per_epoch == 0:
        raise C.RefusalError(f"{n} training pairs are fewer than one effective batch ({args.effective_batch})")
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    alpha = args.alpha if args.alpha is not None else dim_vec.norm().item()
    targets = get_targets(model, tok, harm[:n], safe[:n], dim_vec, dim_layer, args)  # DIM acts at its own layer
    micro_batch = args.micro_batch or (args.effective_batch if device.type == "cuda" else 2)
    clean = get_clean_states(model, tok, safe[:n], targets["retain"], args, micro_batch)
    replaced = None
    if args.judge_refusals:
        targets["refusal"], replaced = judged_refusals(tok, targets["refusal"])
        print(f"--judge-refusals: {replaced} of {n} refusal targets were answers, not refusals: replaced")
    # everything that shapes the training: --resume refuses a checkpoint made with other values
    run_key = {k: getattr(args, k) for k in ("model", "harmful", "harmless", "harmful_val", "harmless_val", "n_train",
                                              "n_val", "seed", "effective_batch",
                                              "epochs", "lr", "amsgrad", "max_grad_norm", "patience", "lr_drops",
                                              "lambda_abl", "lambda_add", "lambda_ret", "answer_tokens", "retain_tokens",
                                              "refusal_tokens")}
    run_key.update(layer=layer, alpha=alpha, dim=C.tensor_hash(dim_vec), betas=tuple(args.betas), dtype=str(model.dtype),
                   orthogonal_to=None if basis is None else C.tensor_hash(basis))
    if args.judge_refusals:  # only when set: checkpoints from before the flag lack the key
        run_key["judge_refusals"] = True
    return SimpleNamespace(
        out=out, ckpt_path=ckpt_path, model=model, tok=tok, device=device, harm=harm[:n], safe=safe[:n], n=n,
        harm_val=harm_val, safe_val=safe_val, dim_vec=dim_vec, dim_layer=dim_layer, layer=layer, basis=basis,
        alpha=alpha,
        targets=targets, refusal_targets_replaced=replaced, clean=clean,
        lambdas={"abl": args.lambda_abl, "add": args.lambda_add, "ret": args.lambda_ret}, micro_batch=micro_batch,
        total=total, run_key=run_key)


# the flags that choose among iterates: part of the resume key of rco.py and repind.py, which choose during the run
SELECTION_FLAGS = ("select_last", "kl_threshold", "induce_threshold")


def batch_order(n, batch, epochs, g):
    """A fresh shuffle of the n pairs per epoch, cut to whole batches: a batch never straddles two shuffles (and so
    never holds a pair twice)."""
    return torch.cat([torch.randperm(n, generator=g)[:n // batch * batch] for _ in range(epochs)])


def training_batch(S, idx):
    """(p_harm, p_safe, t_answer, t_refusal, t_retain, clean retain states if any) for the given pair indices."""
    t = S.targets
    rows = [(S.harm[i], S.safe[i], t["answer"][i], t["refusal"][i], t["retain"][i]) for i in idx]
    return rows if S.clean is None else [row + (S.clean[i],) for row, i in zip(rows, idx)]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    S = setup(args, "rdo")
    model, tok, device, out, ckpt_path, n = S.model, S.tok, S.device, S.out, S.ckpt_path, S.n
    layer, alpha, basis, dim_vec, total, run_key = S.layer, S.alpha, S.basis, S.dim_vec, S.total, S.run_key
    print(f"RDO at layer {layer}, alpha {alpha:.2f}, {n} training pairs, effective batch {args.effective_batch}")

    # Algorithm 1, line 1: initialise r randomly, or at --init (on the sphere; orthogonal to the given directions for RDO-perp)
    g = torch.Generator().manual_seed(args.seed)
    r = initial_direction(args, model, dim_vec, basis, g).requires_grad_(True)
    if args.init:  # a checkpoint of another start must not be resumed from this one (old checkpoints lack the key)
        run_key = {**run_key, "init": args.init}
    if args.sign_warmup:
        if not 0 < args.sign_warmup < total:
            raise C.RefusalError(f"--sign-warmup {args.sign_warmup}: give 0 (off) or fewer steps than the run's {total}")
        run_key = {**run_key, "sign_warmup": args.sign_warmup}
    opt = make_optimizer(r, args)
    order = batch_order(n, args.effective_batch, args.epochs, g)
    state = new_state()
    if args.resume:
        ck = C.load_checkpoint(ckpt_path, run_key)
        with torch.no_grad():
            r.copy_(ck["r"].to(device))
        opt.load_state_dict(ck["opt"])
        state, order = ck["state"], ck["order"]
        print(f"resumed at step {state['step']} from {ckpt_path}")

    bar = tqdm(total=total, initial=state["step"], desc="rdo")
    while state["step"] < total and not state["done"]:  # Algorithm 1, line 2: while not converged
        s = state["step"]
        idx = order[s * args.effective_batch:(s + 1) * args.effective_batch].tolist()  # line 3: sample a batch
        opt.zero_grad()
        batch = training_batch(S, idx)
        lambdas = {**S.lambdas, "add": 0.0} if s < args.sign_warmup else S.lambdas  # --sign-warmup: sign left free
        sums = loss_and_grad(model, tok, r, batch, alpha, layer, lambdas, S.micro_batch)  # line 4
        sums["loss"] = sum(S.lambdas[k] * sums[k] for k in S.lambdas)  # the paper's L, for the schedule and the log
        check_finite(sums["loss"], r.grad, f"step {s}", ckpt_path)
        with torch.no_grad():
            sums["grad_norm"] = sphere_step(opt, r, args.max_grad_norm)  # line 5: a step along the sphere ...
            r.copy_(project_out(r, basis))
            r /= r.norm()  # line 6: ... and back onto it
            if s + 1 == args.sign_warmup:
                sums["flipped"] = choose_sign(model, tok, r, opt, batch, alpha, layer, S.micro_batch)
                tqdm.write(f"step {s}: end of the sign warm-up, r {'flipped' if sums['flipped'] else 'kept'}")
        record_step(opt, state, sums, r, args)
        ck = {"r": r.detach().cpu(), "opt": opt.state_dict(), "state": state, "order": order, "run": run_key}
        C.atomic_write(ckpt_path, lambda tmp: torch.save(ck, tmp))  # Ctrl-C now loses at most this step
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", abl=f"{sums['abl']:.3f}", add=f"{sums['add']:.3f}",
                        ret=f"{sums['ret']:.4f}", lr=f"{opt.param_groups[0]['lr']:.0e}")
        tqdm.write(f"step {s}: loss {sums['loss']:.4f} (abl {sums['abl']:.4f}, add {sums['add']:.4f}, ret {sums['ret']:.4f}), "
              f"lr {opt.param_groups[0]['lr']:.0e}" + (", plateau: stop" if state["done"] else ""))
    bar.close()

    # choose the final direction among the last iterates, as the paper does (Appendix A.3)
    chosen, scored = select_iterate(model, tok, state["iterates"], alpha, layer, S.harm_val, S.safe_val, args)
    direction = state["iterates"][chosen["step"]]
    meta = {"model": args.model, "layer": layer, "alpha": alpha, **C.provenance(args, model), "dim": args.dim, "dim_layer": S.dim_layer,
            "dim_alpha": dim_vec.norm().item(), "orthogonal_to": args.orthogonal_to, "init": args.init or "random",
            "sign_warmup": args.sign_warmup, "refusal_targets_replaced": S.refusal_targets_replaced,
            "chosen_step": chosen["step"], "chosen_scores": chosen, "selection": scored, "history": state["history"],
            "max_abs_cos_with_orthogonal_to": None if basis is None else (basis.cpu() @ direction).abs().max().item(),
            "data": {"train_pairs": n, "harmful_val": len(S.harm_val), "harmless_val": len(S.safe_val)},
            "seconds": round(time.time() - t0, 1)}
    path = C.save_result(out, "rdo", {"direction": direction, "iterates": torch.stack(state["iterates"])}, meta)
    os.remove(ckpt_path)
    print(f"chose step {chosen['step']}: bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, "
          f"kl {chosen['kl']:.4f}\nwrote {path}, {out}/rdo.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    C.run(main)
