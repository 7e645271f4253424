"""The bundled shapes model's own: its data set, its checker and evaluations, and the training research
done on it (extra UNet losses, object masks, hard negatives, preference fine-tuning on its checker).

It builds on sdlab.training and adds itself there when imported, so that training/ never imports it:
- data = "shapes": the procedural set (dataset.py, specs/shapes-dataset.md) as training samples;
- a [shapes] recipe section (options.py); a recipe that holds one is trained by this package's subclass
  of the UNet, text or inpainting trainer (unet.py, text.py, inpaint.py);
- `sdlab train dpo` (dpo.py), judged by the checker (check.py).
The command line imports it; in Python, `import sdlab.shapes` before reading a shapes recipe:

    import sdlab.shapes
    from sdlab.training import load_config, train
    train(load_config("unet", "recipes/shapes-relation.toml", {"base": "runs/shapes-unet-text/last.safetensors"}))

Regions of an object from its palette colour: regions.py. The losses: grounding.py, relation_contrast.py,
scene_contrast.py, recolour.py. Evaluations: evaluation.py (prompt following), edit_eval.py (inpainting
and upscaling).
"""

from ..training.config import RecipeSection, register_data, register_section, register_trainer
from .options import DPOOptions, ShapesOptions, check_dpo_options, check_shapes_options

register_data("shapes", f"{__name__}.dataset")
register_section("shapes", RecipeSection(ShapesOptions, check_shapes_options, trainers={
    "unet": f"{__name__}.unet", "text": f"{__name__}.text", "inpaint": f"{__name__}.inpaint"}))
register_trainer("dpo", DPOOptions, f"{__name__}.dpo", check_dpo_options, bundled_base=True)
