"""Does a GRPO update move the policy toward the rewarded responses, at this learning rate?

Samples one rollout batch with the recipe's settings, applies ``--updates`` optimizer steps to
that same batch, and prints after each the mean change of the summed response log-prob of the
positive- and negative-advantage responses and its correlation with the advantage
(``megatron_metis.trainer.update_probe``). Positive responses that lose log-prob after a few
steps mean the learning rate is too large for the model. One process; the run folder is a
temporary directory unless ``run.output_dir`` is given.

Example (the tiny recipe's warm-up policy):
    python tools/grpo_update_probe.py examples/recipes/grpo-tiny-qwen2.5vl-cpu.yaml \
        model.hf_dir=runs/demo/pipeline/warmup/hf optimizer.lr=5e-5 --updates 5
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--updates", type=int, default=5)
    args = parser.parse_args()

    from megatron_metis.config import load_config
    from megatron_metis.trainer.update_probe import probe_updates

    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if not any(o.startswith("run.output_dir=") for o in overrides):
            overrides.append(f"run.output_dir={tmp}")
        rows = probe_updates(load_config(args.recipe, overrides), updates=args.updates)
    if not rows:
        print("every group of the batch was filtered: nothing to update")
        return 1
    print(f"{int(rows[0]['groups'])} groups, {int(rows[0]['responses'])} responses")
    print("update  dlogp(adv>0)  dlogp(adv<0)  corr(dlogp, adv)")
    for r in rows:
        pos, neg, corr = r["dlogp_pos"], r["dlogp_neg"], r["corr"]
        print(f"{int(r['update']):6d}  {pos:12.4f}  {neg:12.4f}  {corr:16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
