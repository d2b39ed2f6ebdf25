"""Which visual tokens a pruning recipe keeps on shapes-llava: share of object patches kept, share of
all visual tokens kept, and the mean grid row of the kept tokens, per layer.

    .venv/bin/python benchmarks/selection_coverage.py RECIPE.json [RECIPE.json ...] [--scenes 60]

Runs the PyTorch reference of each recipe on the first question of test scenes. A selection that
finds the objects keeps a larger share of object patches than of all tokens; a uniform choice keeps
a mean row of 7.5 (rows 0-15). Use it on the recipes `benchmarks/shapes_accuracy.py` writes.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--scenes", type=int, default=60)
    args = p.parse_args()

    import numpy as np
    import torch

    from mllm_deploy.formats.recipe import load_recipe
    from mllm_deploy.calib.reference import RecipeReference
    from mllm_deploy.scenes import shapes_vqa
    from mllm_deploy.models.loading import load_hf_model
    from mllm_deploy.models.shapes_llava import packaged_model
    from mllm_deploy.tools.shapes_train import prompt_builder
    from mllm_deploy.runtime.preprocess import ImagePreprocessConfig, preprocess

    model_dir = packaged_model()
    model = load_hf_model(model_dir)
    builder = prompt_builder(model_dir)
    image_config = ImagePreprocessConfig.from_model_dir(model_dir)
    side = shapes_vqa.PATCHES_PER_SIDE
    print("| recipe | layer | object patches kept | visual tokens kept | mean row of kept tokens |")
    print("|---|---|---|---|---|")
    for path in args.recipes:
        reference = RecipeReference(model, load_recipe(path))
        per_scene = []
        for index in range(args.scenes):
            scene = shapes_vqa.scene("test", index)
            ids = torch.from_numpy(builder.encode(builder.render_chat(scene.qas[0][0]))[0][None]).long()
            features = reference.image_features(torch.from_numpy(preprocess(scene.image, image_config)))
            _logits, state = reference.prefill(ids, features)
            start = int((ids[0] == model.config.image_token_id).nonzero()[0])
            objects = scene.patch_classes > 0
            rows = []
            for layer in range(len(state.kept)):
                kept = state.kept[layer].reshape(-1).numpy()
                visual = kept[(kept >= start) & (kept < start + side * side)] - start
                rows.append((objects[visual].sum() / objects.sum(), len(visual) / side ** 2,
                             (visual // side).mean() if len(visual) else float("nan")))
            per_scene.append(rows)
        mean = np.nanmean(np.array(per_scene), axis=0)
        for layer, (obj, share, row) in enumerate(mean):
            print(f"| {path} | {layer} | {obj:.0%} | {share:.0%} | {row:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
