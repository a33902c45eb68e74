"""Speed of one RDO optimizer step (16 pairs): rdo.py's COMPUTELOSS against Algorithm 1 written plainly.

  reference  one example at a time, each loss its own forward and backward over every position's logits
  rdo.py mbN rdo.compute_loss at micro-batch N (one variant per --micro-batch value): length-sorted micro-batches
             with padding and masks, logits only at target positions, the clean retain side from C.clean_states
             (computed once per run by rdo.py's setup, as here before the timed steps: its seconds are printed apart)
All run in one process and take turns, a step each, the order rotated every round, so that a machine whose speed
drifts moves them alike. The median of --repeats timed steps is reported, after a warm-up round. All must give
the same loss (relative difference < 1e-3 in fp32; bf16 rounds differently shaped matmuls differently).

  python bench/rdo_step.py [--model DIR] [--dtype bfloat16] [--micro-batch 2 4] [--repeats 3] [--device cuda]
"""
import argparse, os, statistics, sys, time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "saladbench_splits")
LAMBDAS = (1.0, 0.2, 1.0)


def full_ce(model, tok, prompt, target):
    ids = torch.tensor([tok(C.format_chat(tok, [prompt])[0], add_special_tokens=False)["input_ids"] + list(target)],
                       device=C.input_device(model))
    logits = model(input_ids=ids).logits[0].float()  # every position, the whole vocabulary
    n, t = ids.shape[1], len(target)
    return torch.nn.functional.cross_entropy(logits[n - t - 1:n - 1], ids[0, n - t:]), logits, n


def reference_step(model, tok, r, examples, alpha, layer):
    total, (la, ld, lr) = 0.0, LAMBDAS
    for harm, safe, answer, refusal, retain in examples:
        with C.directional_ablation(model, r):
            abl = full_ce(model, tok, harm, answer)[0]
        (la * abl / len(examples)).backward()
        with C.activation_addition(model, alpha * r / r.norm(), layer):
            add = full_ce(model, tok, safe, refusal)[0]
        (ld * add / len(examples)).backward()
        with torch.no_grad():
            _, clean, n = full_ce(model, tok, safe, retain)
        with C.directional_ablation(model, r):
            _, ablated, _ = full_ce(model, tok, safe, retain)
        pos = slice(n - len(retain) - 1, n)  # the last template token and the retain tokens
        p, q = clean[pos].log_softmax(-1), ablated[pos].log_softmax(-1)
        ret = (p.exp() * (p - q)).sum(-1).mean()
        (lr * ret / len(examples)).backward()
        total += (la * abl + ld * add + lr * ret).item() / len(examples)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/refusal-test-models/qwen2.5-coder-0.5b-instruct"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--micro-batch", type=int, nargs="+", default=None,
                   help="one rdo.py variant per value (default: rdo.py's, 16 on a GPU, 2 on a CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer", type=int, default=14)
    args = p.parse_args()
    model, tok = C.load_model(args.model, args.device, args.dtype)
    dev = C.input_device(model)
    harm = C.get_prompts(os.path.join(DATA, "harmful_train.json"), 16, 1, os.path.join(DATA, "harmful_val.json"))[0]
    safe = C.get_prompts(os.path.join(DATA, "harmless_train.json"), 16, 1, os.path.join(DATA, "harmless_val.json"))[0]
    answer = C.generate_ids(model, tok, harm, 30, 16, desc="answer targets")
    retain = C.generate_ids(model, tok, safe, 29, 16, desc="retain targets")
    refusal = tok("I'm sorry, but I can't assist with that", add_special_tokens=False)["input_ids"]
    examples = [(h, s, a, refusal, t) for h, s, a, t in zip(harm, safe, answer, retain)]
    micros = args.micro_batch or [16 if dev.type == "cuda" else 2]
    t = time.time()
    states = C.clean_states(model, tok, examples, micros[0])
    print(f"clean retain states for the 16 pairs: {time.time() - t:.1f} s (once per run)")
    with_states = examples if states is None else [e + (h,) for e, h in zip(examples, states)]
    r0 = torch.nn.functional.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)),
                                       dim=0).to(dev)
    step = {"reference": lambda r: reference_step(model, tok, r, examples, 12.0, args.layer)}
    for m in micros:
        S = SimpleNamespace(model=model, tok=tok, device=dev, micro_batch=m, alpha=12.0, layer=args.layer)
        step[f"rdo.py mb{m}"] = lambda r, S=S: sum(w * x for w, x in zip(LAMBDAS, rdo.compute_loss(
            S, r, with_states, LAMBDAS).values()))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, losses = {v: [] for v in step}, {}
    for i in range(1 + args.repeats):  # a warm-up round, then the timed ones
        for v in list(step)[i % len(step):] + list(step)[:i % len(step)]:
            r = r0.clone().requires_grad_(True)
            sync()
            t = time.time()
            losses[v] = step[v](r)
            sync()
            print(f"round {i}{' (warm-up)' if not i else ''}: {v} {time.time() - t:.1f} s, loss {losses[v]:.5f}",
                  flush=True)
            if i:
                times[v].append(time.time() - t)
    ref = statistics.median(times["reference"])
    print(f"\n{os.path.basename(args.model)}, {model.dtype}, {dev}, 16 pairs, median of {args.repeats} interleaved "
          f"steps; loss: relative difference to the reference's")
    print(f"{'variant':14s} {'seconds':>8s} {'vs reference':>13s} {'per round':>20s} {'loss':>8s}")
    for v in step:
        med, rounds = statistics.median(times[v]), [a / b for a, b in zip(times["reference"], times[v])]
        print(f"{v:14s} {med:8.2f} {ref / med:12.2f}x {' '.join(f'{x:.2f}' for x in rounds):>20s} "
              f"{abs(losses[v] - losses['reference']) / abs(losses['reference']):8.1e}")


if __name__ == "__main__":
    main()
