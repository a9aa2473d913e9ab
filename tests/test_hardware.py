from pathlib import Path

from scratch_diffusion.hardware import cpu_name, has_cpu_flag


def test_cpu_name_is_the_model_name_of_this_machine():
    name = cpu_name()
    assert name and "\n" not in name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert f": {name}" in cpuinfo.read_text()


def test_cpu_flags_are_matched_whole():
    assert has_cpu_flag("no_such_flag_anywhere") is False
    assert has_cpu_flag("avx512") is False  # a prefix of real flags (avx512f, ...), never a flag itself
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " fpu " in cpuinfo.read_text():
        assert has_cpu_flag("fpu")
