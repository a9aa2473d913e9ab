import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scratch_diffusion.hardware import Hardware, choose, cpu_class, cpu_flags, cpu_name, detect, machine

# /proc/cpuinfo flags of the machine classes handed out here (abridged to what matters).
AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
AVX512 = AVX2 | {"avx512f", "avx512bw"}  # AVX-512 without bf16 (e.g. Skylake-SP)
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}


def test_cpu_name_is_the_model_name_of_this_machine():
    name = cpu_name()
    assert name and "\n" not in name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert f": {name}" in cpuinfo.read_text()


def test_machine_names_the_cpu_class_without_a_gpu():
    if torch.cuda.is_available():
        assert machine() == torch.cuda.get_device_name()
    else:
        assert machine() == f"{cpu_name()}, {os.cpu_count()} cores, {cpu_class(cpu_flags())}"


def test_cpu_flags_are_matched_whole():
    flags = cpu_flags()
    assert "no_such_flag_anywhere" not in flags
    assert "avx512" not in flags  # a prefix of real flags (avx512f, ...), never a flag itself
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " fpu " in cpuinfo.read_text():
        assert "fpu" in flags


@pytest.mark.parametrize(
    ("flags", "cls"),
    [(AVX2, "AVX2"), (AVX512, "AVX512"), (AVX512_BF16, "AVX512-BF16"), (AMX, "AMX"), (frozenset({"sse2"}), "pre-AVX2")],
)
def test_cpu_class(flags, cls):
    assert cpu_class(flags) == cls


@pytest.mark.parametrize(
    ("hardware", "basic", "unet2d"),
    [
        # The rule (runs too short to time): bf16 only where native; the BasicUNet in NHWC, the UNet2DModel in NCHW.
        (Hardware("cpu", AVX2), ("fp32", True), ("fp32", False)),
        (Hardware("cpu", AVX512), ("fp32", True), ("fp32", False)),
        (Hardware("cpu", AVX512_BF16), ("bf16", True), ("bf16", False)),
        (Hardware("cpu", AMX - {"avx512_bf16"}), ("bf16", True), ("bf16", False)),  # AMX tiles count on their own
        (Hardware("cuda", AVX2, cuda_bf16=True), ("bf16", True), ("bf16", False)),
        (Hardware("cuda", AVX512_BF16, cuda_bf16=False), ("fp32", True), ("fp32", False)),  # e.g. a V100
        (Hardware("mps", frozenset()), ("fp32", True), ("fp32", False)),
    ],
)
def test_auto_follows_the_hardware(hardware, basic, unet2d):
    for network, want in (("basic", basic), ("unet2d", unet2d)):
        choice = choose(network, "auto", "auto", hardware)
        assert (choice.precision, choice.channels_last) == want
        assert choice.warning == ""


def test_explicit_values_are_honoured_and_emulated_bf16_is_named():
    slow = choose("unet2d", "bf16", True, Hardware("cpu", AVX2))
    assert (slow.precision, slow.channels_last) == ("bf16", True)
    assert "emulates" in slow.warning and "AVX2" in slow.warning
    for hardware in (Hardware("cpu", AVX512_BF16), Hardware("cuda", AVX2, cuda_bf16=True)):
        assert choose("unet2d", "bf16", False, hardware).warning == ""
    fp32 = choose("basic", "fp32", False, Hardware("cpu", AMX))
    assert (fp32.precision, fp32.channels_last, fp32.warning) == ("fp32", False, "")
    assert choose("unet2d", "fp16", "auto", Hardware("cuda", AVX2, cuda_bf16=True)).precision == "fp16"


def test_the_line_a_stage_prints():
    choice = choose("unet2d", "auto", "auto", Hardware("cpu", AVX2))
    assert choice.line("train-unet2d", 2) == "train-unet2d: fp32 NCHW by rule (CPU: AVX2, no native bf16), 2 threads"
    short = replace(choice, why="6 steps are too few to pay for timing")
    assert short.line("train-unet2d", 2) == (
        "train-unet2d: fp32 NCHW by rule, not timed: 6 steps are too few to pay for timing "
        "(CPU: AVX2, no native bf16), 2 threads"
    )
    cuda = choose("basic", "bf16", True, Hardware("cuda", AVX2, cuda_bf16=True))
    assert replace(cuda, chosen_by="params").line("train-basic", 8) == (
        "train-basic: bf16 NHWC as params say (CUDA: native bf16), 8 threads"
    )
    timed = replace(choice, channels_last=True, chosen_by="timed", timings=(("fp32 NCHW", 34.8), ("fp32 NHWC", 42.2)))
    assert timed.line("train-unet2d", 2) == (
        "train-unet2d: timed fp32 NCHW 35 img/s, fp32 NHWC 42; chose fp32 NHWC (CPU: AVX2, no native bf16), 2 threads"
    )
    cached = replace(timed, chosen_by="cached", timings=(("fp32 NCHW", math.nan), ("fp32 NHWC", 42.2)))
    assert cached.line("x", 1).startswith(
        "x: timed fp32 NCHW (loss not finite), fp32 NHWC 42; chose fp32 NHWC (cached)"
    )
    assert timed.as_params() == {
        "resolved.precision": "fp32",
        "resolved.channels_last": True,
        "resolved.hardware": "CPU: AVX2, no native bf16",
        "resolved.chosen_by": "timed",
        "resolved.timings": "fp32 NCHW 35 img/s, fp32 NHWC 42",
    }


def test_unknown_values_are_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; allowed: auto, fp32, bf16, fp16"):
        choose("basic", "fp8", "auto", Hardware("cpu", AVX2))
    with pytest.raises(ValueError, match="unknown channels_last 'yes'"):
        choose("basic", "auto", "yes", Hardware("cpu", AVX2))
    with pytest.raises(ValueError, match="unknown network"):
        choose("vae", "auto", "auto", Hardware("cpu", AVX2))


def test_detect_reads_this_machine():
    here = detect("cpu")
    assert here.device == "cpu" and here.cpu_flags == cpu_flags() and here.cuda_bf16 is False
    assert here.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def test_detect_takes_a_torch_device_as_its_type():
    import torch

    assert detect(torch.device("cpu")) == detect("cpu") and detect(torch.device("cpu")).device == "cpu"
