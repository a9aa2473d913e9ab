"""An unlabelled folder's FID on Inception-v3 features (classifier.inception_weights): check-params' note and
refusals, the judge built on torchmetrics' FID network, and the compare stage writing Inception FIDs with their
intervals. No real Inception weights can be fetched here: the weights file is torch-fidelity's own network, randomly
initialised and saved as the real file is (a state dict), so every line from the file to the FID runs for real."""

import json
import re
import sys

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from scratch_diffusion import data
from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.metrics import (
    InceptionFeatures,
    Judge,
    frechet_distance,
    frechet_distance_of_features,
    gaussian,
)
from scratch_diffusion.models.classifier import Classifier
from scratch_diffusion.preflight import DataFacts, check_data
from tests.conftest import make_shapes, write_params
from tests.test_judge import project_with, run_stage_main, write_samples

N = 3  # sample-set size: each image costs Inception a 299 x 299 forward pass (tenths of a second on a CPU)


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 as its constructor builds it, keeping the random initialisation instead of
    loading the weights it reads."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file in the real file's format: the state dict of a randomly initialised Inception-v3."""
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save({}, path)  # the constructor reads the file before (not) loading it
    torch.manual_seed(0)
    net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            # He initialisation keeps the activations' scale through the ~50 layers (PyTorch's default shrinks it
            # to ~1e-8 at the pool, where every FID would be ~0).
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_the_fid_from_features_is_frechet_distance():
    """frechet_distance_of_features (the (N, N) form behind Inception's FID) equals the (d, d) eigenvalue form, with
    more images than features and with fewer (Inception's case: 2048 features)."""
    g = torch.Generator().manual_seed(0)
    for n1, n2, d in ((50, 40, 16), (5, 6, 64)):
        f1 = torch.randn(n1, d, generator=g, dtype=torch.float64)
        f2 = torch.randn(n2, d, generator=g, dtype=torch.float64) + 0.3
        expected = frechet_distance(*gaussian(f1), *gaussian(f2))
        assert frechet_distance_of_features(f1, f2) == pytest.approx(expected, rel=1e-7), (n1, n2, d)
    f = torch.randn(4, 2048, generator=g, dtype=torch.float64)
    assert frechet_distance_of_features(f, f) == pytest.approx(0, abs=1e-9)


class _RunsCode:
    """Pickles as a call of os.mkdir(path): what a full unpickler would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_check_params_says_what_compare_measures_and_refuses_a_bad_weights_file(tmp_path, weights, monkeypatch):
    src = make_shapes(tmp_path / "flat", per_class=16, classes=())
    folder = {"dataset": "folder", "source": str(src), "resolution": 16, "channels": 3, "held_out": 0.25}
    small = {"data": folder, "sample": {"n": 2}, **{k: {"batch_size": 8} for k in ("basic", "unet2d", "classifier")}}
    facts = DataFacts.listed(params_from_dict(small), data.source_listing("folder", str(src), 3, 0.25))

    def notes(inception_weights: str) -> list[str]:
        return check_data(
            params_from_dict({**small, "classifier": {**small["classifier"], "inception_weights": inception_weights}}),
            facts,
        )

    (note,) = notes("")
    assert "no FID" in note and note.endswith(
        "set classifier.inception_weights to the FID Inception-v3 weights file (torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth)"
    )
    (note,) = notes(str(weights))
    assert "compare will measure FID and KID on Inception-v3 features (classifier.inception_weights)" in note
    assert "but no recognised share or class coverage (they need classes" in note

    missing = str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(
        ParamsError, match=re.escape(f"classifier.inception_weights: got '{missing}', which is no file; ")
    ) as e:
        notes(missing)
    assert "\n" not in str(e.value)
    wrong = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ParamsError, match="which torchmetrics' Inception-v3 cannot load \\(RuntimeError: ") as e:
        notes(str(wrong))
    assert "\n" not in str(e.value)
    # A file from someone else whose pickle names code: refused before torch-fidelity's full unpickler could run it.
    ran = tmp_path / "ran"
    torch.save({"fc.weight": _RunsCode(str(ran))}, tmp_path / "evil.pth")
    with pytest.raises(ParamsError, match="refused, not a plain file of weights: loading it could run code"):
        notes(str(tmp_path / "evil.pth"))
    assert not ran.exists()
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as where it is not installed: no module to find
    with pytest.raises(ParamsError, match="torch-fidelity .* is not installed: `pip install torch-fidelity`"):
        notes(str(weights))


def test_the_weights_are_unused_on_labelled_data_and_check_params_says_so(weights):
    params = params_from_dict({"classifier": {"inception_weights": str(weights)}})
    (note,) = check_data(params, DataFacts.named(params))
    assert note == (
        "classifier.inception_weights is set but unused: mnist is labelled, so compare measures FID on the classifier "
        "trained on its classes"
    )


def test_an_inception_judge_measures_fid_on_an_unlabelled_grey_folder(tmp_path, weights):
    """Without a classifier, the judge measures FID and KID (with intervals) on Inception's features of grey images
    repeated to RGB: the held-out set's FID is the floor, noise is far worse; recognised and coverage stay None."""
    src = make_shapes(tmp_path / "flat", per_class=12, classes=())
    data.download("folder", str(src), tmp_path / "ds", resolution=32, channels=1, held_out=0.5)
    test_x, _ = data.load_split(tmp_path / "ds", train=False)
    train_x, _ = data.load_split(tmp_path / "ds", train=True)
    assert test_x.shape == (6, 1, 32, 32)
    inception = InceptionFeatures(weights, device="cpu")
    assert torch.equal(inception(test_x[:1]), inception(test_x[:1].expand(-1, 3, -1, -1)))  # grey is RGB repeated
    with pytest.raises(ValueError, match="got images of dtype torch.float32; allowed: uint8"):
        inception(test_x[:1].float() / 255)

    judge = Judge(None, test_x, train_x, N, resamples=20, no_classifier="unlabelled", inception=inception)
    assert judge.floor > 0 and judge.real_recognised is None and judge.reference_features.shape == (N, 2048)
    m = judge.measure(test_x[N : 2 * N])
    assert m["fid"] == pytest.approx(judge.floor, abs=1e-9)  # the held-out set itself
    for key in ("fid", "kid", "memorised"):
        assert m[f"{key}_lo"] - 1e-12 <= m[key] <= m[f"{key}_hi"] + 1e-12, key
    assert all(m[key] is None for key in ("recognised", "coverage_kl", "coverage_entropy"))
    noise = torch.randint(0, 256, (N, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert judge.fid(noise) > 3 * judge.floor
    with pytest.raises(ValueError, match="not both"):
        Judge(Classifier(1, 32, 2, [0.0], [1.0]), test_x, train_x, N, inception=inception)


def test_compare_writes_inception_fids_for_an_unlabelled_folder(tmp_path, weights, monkeypatch, capsys):
    """compare in-process on an unlabelled RGB folder with classifier.inception_weights set: metrics/compare.json and
    the report carry FID and KID with intervals and say they are Inception FIDs; recognised and coverage stay n/a and
    the held-out set scores the floor."""
    project = project_with(tmp_path, classes=(), per_class=8 * N)  # a quarter held out: N + N test images
    write_params(project, {"classifier": {"inception_weights": str(weights)}})
    run_stage_main("train_classifier", project, monkeypatch)
    test_x, _ = data.load_split(project / "data/dataset", train=False)
    write_samples(project, test_x[N : 2 * N].permute(0, 2, 3, 1).contiguous())  # as the sampler writes RGB
    capsys.readouterr()
    run_stage_main("compare", project, monkeypatch)
    out = capsys.readouterr().out
    assert "compare: FID and KID on Inception-v3 pool features (2048), weights weights-inception-random.pth" in out
    assert "compare: basic/toy-3: Inception FID " in out

    compare = json.loads((project / "metrics/compare.json").read_text())
    assert compare["fid_features"].endswith(f"sha256 {data.sha256_file(weights)[:16]}")
    row = compare["settings"]["basic/toy-3"]
    measured = {f"{key}{side}" for key in ("fid", "kid") for side in ("", "_lo", "_hi")}
    assert set(row) == measured | {"nfe", "verdict", "memorised", "seconds_per_image"}  # no recognised, no coverage
    assert row["fid"] == pytest.approx(compare["real_floor_fid"], abs=1e-9)  # the held-out set: the floor
    assert row["fid_lo"] <= row["fid"] <= row["fid_hi"] and row["kid_lo"] <= row["kid"] <= row["kid_hi"]
    assert compare["best_fid_basic"] == row["fid"] and compare["best_recognised_basic"] is None
    assert compare["real_recognised"] is None
    report = (project / "reports/compare.md").read_text()
    assert "FID is measured on Inception-v3 pool features" in report and "These Inception FIDs compare with" in report
    assert "| n/a |" in report and "Best setting: **basic/toy-3**" in report and "recognised with" not in report
    assert (project / "plots/compare/fid_vs_nfe.tsv").read_text().count("\n") == 2  # the header and the setting
