"""Why RDO's addition fell short of DIM's on Qwen2.5-Coder-0.5B-Instruct (not part of CI): three measurements.

1. The paper's refusal targets: how many t_refusal in each cached target set are answers by the substring judge
   (rdo.judged_refusals, what --judge-refusals replaces).
2. What the addition loss sees: the cross-entropy of one fixed refusal ("I'm sorry, but I can't assist with
   that.") on 64 held-out harmless prompts with alpha r_hat added at the layer, in all and on its first token.
3. What the judge sees: how the induced refusals of an `evaluate.py induce` run begin (first two words).

  python bench/refusal_targets.py --directions runs/bench/dim_qwen/selected/dim.safetensors runs/bench/X/rdo.safetensors \
      --induce runs/bench/eval_qwen_induce256/eval_induce.json
"""
import argparse, collections, glob, json, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
from evalkit import QWEN, held_out  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--targets", default="runs/qwen2.5-coder-0.5b-instruct/targets", help="rdo.py's target cache folder")
p.add_argument("--directions", nargs="*", default=[], help="dim.py / rdo.py results (layer and alpha from each)")
p.add_argument("--induce", nargs="*", default=[], help="eval_induce.json files of evaluate.py")
p.add_argument("--n", type=int, default=64)
args = p.parse_args()

model, tok = C.load_model(QWEN)
print("1. t_refusal targets that are answers (--judge-refusals replaces them)")
for path in sorted(glob.glob(os.path.join(args.targets, "targets_*.json"))):
    refusal = json.load(open(path))["refusal"]
    print(f"  {os.path.basename(path)}: {rdo.judged_refusals(tok, refusal)[1]} of {len(refusal)}")

if args.directions:
    print(f"\n2. CE of a fixed refusal with alpha r_hat added, {args.n} held-out harmless prompts: all tokens / first token")
    sentence = tok("I'm sorry, but I can't assist with that.", add_special_tokens=False)["input_ids"]
    safe = held_out(args.n)[1]
    batch = rdo.pack(tok, safe, [sentence] * len(safe), C.input_device(model))
    for path in args.directions:
        vec, meta = C.load_direction(path, model)
        with torch.no_grad(), C.activation_addition(model, meta["alpha"] * vec.float() / vec.float().norm(), meta["layer"]):
            logits = rdo.window_logits(model, batch, len(sentence) + 1)  # every row ends with the same sentence
        labels = batch["input_ids"][:, -len(sentence):]
        ce = C.token_ce(logits[:, :-1].flatten(0, 1).float(), labels.flatten()).view(labels.shape)
        print(f"  {path}: {ce.mean():.3f} / {ce[:, 0].mean():.3f}")

for path in args.induce:
    print(f"\n3. how the induced refusals begin ({path})")
    for label, runs in json.load(open(path))["results"].items():
        r = runs[0]
        starts = collections.Counter(" ".join(t.split()[:2]) for t, y in zip(r["completions"], r["refused"]) if y)
        print(f"  {label}: {sum(r['refused'])} refusals; {starts.most_common(3)}")
