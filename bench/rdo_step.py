"""Speed of one RDO optimizer step (16 pairs) on Qwen2.5-Coder-0.5B-Instruct: rdo.py vs a plain reference.

  reference  Algorithm 1 written plainly: one example at a time, each loss its own forward/backward, full logits
  rdo.py     rdo.loss_and_grad: length-sorted micro-batches, padding + masks, logits only at target positions,
             the chat template's shared prefix run once per intervention (on a CPU: rdo.SHARE_PREFIX), the clean
             retain logits from rdo.clean_states (the LM head's input, computed once per target set, before the
             timed steps and not counted in them: rdo.py computes them with its targets and caches them on disk)
  inline     rdo.py's step with the clean retain pass in it (without autograd), as before the clean states
  floor      rdo.py's forward (+ backward) passes over the same tokens with no hooks and no loss bookkeeping (no
             clean pass: rdo.py's step runs none)
Each variant runs in its own process (so that peak memory is its own): load, one warm-up step, then --repeats
timed steps (the median is reported: this machine's speed drifts by tens of percent from minute to minute).
With --interleave they share one process and take turns, a step each, so that the drift moves them alike.
Peak memory = the process's peak RSS (VmHWM, reset after loading) minus its RSS after loading the model.
The rdo.py line also gives the seconds rdo.clean_states took for the 16 pairs (once, untimed in the step).
rdo.py and the reference must give the same loss: relative difference < 1e-3 in fp32. In bf16 the rounding of
differently shaped matmuls alone moves a loss by about that much, so the bf16 line also prints how far the
reference's own bf16 loss is from its fp32 loss, for scale.

  python bench/rdo_step.py [--dtypes bfloat16 float32] [--micro-batch 4] [--repeats 3] [--device cuda]
  python bench/rdo_step.py --variants rdo.py inline floor   # what the clean states save
  python bench/rdo_step.py --dtypes bfloat16 --variants reference rdo.py inline floor --interleave --repeats 5
  python bench/rdo_step.py --random-weights CONFIG_DIR --device cuda --micro-batch 16   # speed only, Qwen's shape
  python bench/rdo_step.py ... --prefix off      # rdo.py and the floor with every row run whole (on: shared on
                                                 # any device; auto: rdo.SHARE_PREFIX's rule, shared on a CPU)
  python bench/rdo_step.py --random-weights CONFIG_DIR --config gemma2 ...   # another model's shape, Qwen's tokens
"""
import argparse, json, math, os, statistics, subprocess, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
from evalkit import random_model  # noqa: E402

MODEL = os.path.expanduser("~/.cache/refusal-test-models/qwen2.5-coder-0.5b-instruct")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "saladbench_splits")
LAMBDAS = {"abl": 1.0, "add": 0.2, "ret": 1.0}
LAYER = 14


def ratio(a, b):
    """'1.53x', or blank where a variant was not run."""
    return "" if math.isnan(a / b) else f"{a / b:.2f}x"


def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_examples(model, tok, n=16):
    """16 pairs with targets of realistic lengths: 30 answer tokens, 29 retain tokens, a one-sentence refusal."""
    harm = C.get_prompts(os.path.join(DATA, "harmful_train.json"), n, 1, os.path.join(DATA, "harmful_val.json"))[0]
    safe = C.get_prompts(os.path.join(DATA, "harmless_train.json"), n, 1, os.path.join(DATA, "harmless_val.json"))[0]
    answer = C.generate_ids(model, tok, harm, 30, 16, desc="answer targets")
    retain = C.generate_ids(model, tok, safe, 29, 16, desc="retain targets")
    refusal = tok("I'm sorry, but I can't assist with that.", add_special_tokens=False)["input_ids"]
    return [(h, s, a, refusal, t) for h, s, a, t in zip(harm, safe, answer, retain)]


def full_ce(model, tok, prompt, target):
    ids = torch.tensor([tok(C.format_chat(tok, [prompt])[0], add_special_tokens=False)["input_ids"] + list(target)],
                       device=C.input_device(model))
    logits = model(input_ids=ids).logits[0].float()  # every position, the whole vocabulary
    n, t = ids.shape[1], len(target)
    return torch.nn.functional.cross_entropy(logits[n - t - 1:n - 1], ids[0, n - t:]), logits, n


def reference_step(model, tok, r, batch, alpha, layer):
    total = 0.0
    for harm, safe, answer, refusal, retain in batch:
        with C.directional_ablation(model, r):
            abl = full_ce(model, tok, harm, answer)[0]
        (LAMBDAS["abl"] * abl / len(batch)).backward()
        with C.activation_addition(model, alpha * r / r.norm(), layer):
            add = full_ce(model, tok, safe, refusal)[0]
        (LAMBDAS["add"] * add / len(batch)).backward()
        with torch.no_grad():
            _, clean, n = full_ce(model, tok, safe, retain)
        with C.directional_ablation(model, r):
            _, ablated, _ = full_ce(model, tok, safe, retain)
        pos = slice(n - len(retain) - 1, n)  # the last template token and the retain tokens
        p, q = clean[pos].log_softmax(-1), ablated[pos].log_softmax(-1)
        ret = (p.exp() * (p - q)).sum(-1).mean()
        (LAMBDAS["ret"] * ret / len(batch)).backward()
        total += (LAMBDAS["abl"] * abl + LAMBDAS["add"] * add + LAMBDAS["ret"] * ret).item() / len(batch)
    return total


def with_clean_states(model, tok, batch, micro_batch):
    """The examples as rdo.py's loop sees them: each with its clean retain states (rdo.clean_states), which rdo.py
    computes once per target set. Returns them and the seconds that took."""
    t = time.time()
    states = rdo.clean_states(model, tok, [b[1] for b in batch], [b[4] for b in batch], micro_batch)
    sync(C.input_device(model))
    return [b + (s,) for b, s in zip(batch, states)], time.time() - t


def floor_step(model, tok, batch, micro_batch):
    """rdo.py's passes over the same micro-batches (the rows after the shared template prefix, which runs once per
    loss where rdo.shared_prefix shares it) with no hooks and no losses: the gradient enters through one add-zero
    hook at block 0 (at the addition layer for the addition pass, as in rdo.py) instead of through r."""
    harm, safe, answer, refusal, retain = zip(*batch)
    for key, prompts, targets in (("abl", harm, answer), ("add", safe, refusal), ("ret", safe, retain)):
        prefix = rdo.shared_prefix(tok, prompts, targets, model)
        with torch.no_grad():
            kv = None if prefix is None else rdo.prefix_kv(model, prefix)
        for _, b in rdo.micro_batches(tok, prompts, targets, micro_batch, model, prefix):
            k = int(b["n_target"].max()) + 1
            b["kv"] = kv
            zero = torch.zeros(C.hidden_size(model), device=C.input_device(model), requires_grad=True)
            with C.activation_addition(model, zero, LAYER if key == "add" else 0):
                rdo.window_logits(model, b, k).float().logsumexp(-1).mean().backward()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load_config(name):
    """A folder with a config.json, or a model type whose transformers defaults to take (gemma2: Gemma-2-2B)."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(name) if os.path.isdir(name) else AutoConfig.for_model(name)


def child(variants, dtype, micro_batch, repeats, examples_path, device, random_weights=None, prefix="auto", config=None):
    """Time the comma-separated variants in one process: each round runs one step of each, the order rotated
    from round to round (--interleave; peak memory is then not reported), or one variant alone."""
    variants = variants.split(",")
    if random_weights:
        model, tok = random_model(random_weights, device, dtype, config and load_config(config))
    else:
        model, tok = C.load_model(MODEL, device, dtype)
    dev = C.input_device(model)
    if prefix != "auto":  # rdo.py and the floor with (on any device) or without the shared template prefix
        rdo.SHARE_PREFIX = {dev.type} if prefix == "on" else set()
    batch = [tuple(e) for e in json.load(open(examples_path))]
    r0 = torch.nn.functional.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)), dim=0).to(dev)
    alpha, layer = 12.0, LAYER
    if dev.type == "cuda":  # torch's peak allocated memory over the loaded model
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: loading is not counted
        base = rss_mb()
    clean_seconds, with_states = None, batch
    # rdo.py's clean retain states, made once per target set as its setup makes them (and caches them). Inside the
    # peak: resetting it after them would count less than a run holds (the freed memory stays in the RSS baseline)
    if "rdo.py" in variants:
        sync(dev)
        with_states, clean_seconds = with_clean_states(model, tok, batch, micro_batch)
    step = {"reference": lambda r: reference_step(model, tok, r, batch, alpha, layer),
            "rdo.py": lambda r: rdo.loss_and_grad(model, tok, r, with_states, alpha, layer, LAMBDAS, micro_batch)["loss"],
            "inline": lambda r: rdo.loss_and_grad(model, tok, r, batch, alpha, layer, LAMBDAS, micro_batch)["loss"],
            "floor": lambda r: floor_step(model, tok, batch, micro_batch) or float("nan")}
    times, losses = {v: [] for v in variants}, {}
    for i in range(1 + repeats):  # a warm-up round, then the timed ones
        for variant in variants[i % len(variants):] + variants[:i % len(variants)]:
            r = r0.clone().requires_grad_(True)
            sync(dev)
            t = time.time()
            losses[variant] = step[variant](r)
            sync(dev)
            times[variant].append(time.time() - t)
    if len(variants) > 1:
        peak = math.nan
    elif dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    for v in variants:
        print(json.dumps({"variant": v, "dtype": dtype, "seconds": statistics.median(times[v][1:]),
                          "all_seconds": times[v][1:], "loss": losses[v], "peak_mb": peak - base,
                          "clean_states_seconds": clean_seconds if v == "rdo.py" else None,
                          "shared_prefix": dev.type in rdo.SHARE_PREFIX}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up); the median is reported")
    p.add_argument("--variants", nargs="+", default=["reference", "rdo.py", "floor"],
                   choices=["reference", "rdo.py", "inline", "floor"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then torch's peak allocated)")
    p.add_argument("--random-weights", default=None, help="a folder with Qwen's config.json and tokenizer: random "
                   "weights, speed only (needs the examples file of an earlier run with the real model)")
    p.add_argument("--config", default=None, help="with --random-weights: this shape instead (a folder with a "
                   "config.json, or a model type: gemma2 is Gemma-2-2B), with the folder's tokenizer and examples")
    p.add_argument("--prefix", choices=["auto", "on", "off"], default="auto", help="rdo.py and the floor with "
                   "the shared template prefix run once (on), every row run whole (off), or rdo.SHARE_PREFIX's rule")
    p.add_argument("--interleave", action="store_true", help="all variants in one process, a step of each in turn "
                   "(the order rotated each round): ratios that this machine's drift does not move; no peak memory")
    p.add_argument("--json", default="runs/bench/rdo_step.json")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child[:2], args.micro_batch, args.repeats, args.child[2], args.device, args.random_weights,
                     args.prefix, args.config)
    examples_path = "runs/bench/rdo_step_examples.json"  # prompts and target ids, made once with the real model
    if args.config and not args.random_weights:
        sys.exit("--config needs --random-weights (a folder with Qwen's tokenizer)")
    if not os.path.isdir(MODEL) and not (args.random_weights and os.path.isfile(examples_path)):
        sys.exit(f"{MODEL} not found: run python ../shared/scripts/get_test_models.py first")
    os.makedirs("runs/bench", exist_ok=True)
    if not os.path.isfile(examples_path):
        model, tok = C.load_model(MODEL, "cpu", "float32")
        C.save_json(examples_path, make_examples(model, tok))
        del model
    rows = []
    for dtype in args.dtypes:
        for variant in [",".join(args.variants)] if args.interleave else args.variants:
            res = subprocess.run([sys.executable, __file__, "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats),
                                  "--device", args.device,
                                  *(["--random-weights", args.random_weights] if args.random_weights else []),
                                  "--prefix", args.prefix,
                                  *(["--config", args.config] if args.config else []),
                                  "--child", variant, dtype, examples_path], capture_output=True, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
            if not lines:
                sys.exit(f"{variant} {dtype} failed:\n{res.stderr[-3000:]}")
            for line in lines:
                rows.append({**json.loads(line), "micro_batch": args.micro_batch, "device": args.device,
                             "random_weights": args.random_weights, "config": args.config, "prefix": args.prefix,
                             "interleaved": args.interleave})
                print(rows[-1], flush=True)
    what = (f"random weights in the shape of {args.config or args.random_weights}" if args.random_weights
            else "Qwen2.5-Coder-0.5B-Instruct")
    print(f"\none optimizer step, 16 pairs, {what} on {args.device}, {torch.get_num_threads()} threads, "
          f"micro-batch {args.micro_batch}, median of {args.repeats}{' (interleaved)' if args.interleave else ''}, shared prefix: "
          f"{'yes' if rows[-1]['shared_prefix'] else 'no'} (--prefix {args.prefix})")
    print(f"{'dtype':9s} {'variant':10s} {'seconds':>8s} {'vs ref':>7s} {'vs floor':>8s} {'peak MB':>8s} {'loss':>9s}")
    for dtype in args.dtypes:
        by = {r["variant"]: r for r in rows if r["dtype"] == dtype}
        ref, floor = by.get("reference", {}).get("seconds", math.nan), by.get("floor", {}).get("seconds", math.nan)
        for v, r in by.items():
            print(f"{dtype:9s} {v:10s} {r['seconds']:8.3g} {ratio(ref, r['seconds']):>7s} "
                  f"{ratio(r['seconds'], floor):>8s} {r['peak_mb']:8.0f} {r['loss']:9.5f}")
        if by.get("rdo.py", {}).get("clean_states_seconds") is not None:
            print(f"{dtype:9s} rdo.clean_states for the 16 pairs (once per target set, not in the step): "
                  f"{by['rdo.py']['clean_states_seconds']:.3g} s")
        if "reference" in by and "rdo.py" in by:
            rel = abs(by["rdo.py"]["loss"] - by["reference"]["loss"]) / abs(by["reference"]["loss"])
            verdict = ("ok" if rel < 1e-3 else "MISMATCH") if dtype == "float32" else "bf16: see the scale"
            print(f"{dtype:9s} loss relative difference rdo.py vs reference: {rel:.2e} ({verdict})")
    fp32 = next((r for r in rows if r["dtype"] == "float32" and r["variant"] == "reference"), None)
    for r in rows:
        if fp32 and r["dtype"] != "float32" and r["variant"] == "reference":
            print(f"scale: the reference's own {r['dtype']} loss vs its float32 loss: "
                  f"{abs(r['loss'] - fp32['loss']) / abs(fp32['loss']):.2e}")
    seconds = {(r["variant"], r["dtype"]): r["seconds"] for r in rows}
    for v in args.variants:  # is the half-precision dtype worth it on this machine (the rule of --dtype auto)?
        for dtype in args.dtypes:
            if dtype != "float32" and (v, dtype) in seconds and (v, "float32") in seconds:
                print(f"{v}: {dtype} {ratio(seconds[v, 'float32'], seconds[v, dtype])} as fast as float32")
    C.save_json(args.json, rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
