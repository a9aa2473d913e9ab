"""How fast the pipeline trains and samples, against the lesson's own loop on the same machine. Prints ratios.

    python benchmarks/speed.py                      # everything; needs data/dataset
    python benchmarks/speed.py --only train --models basic --repeats 5
    python benchmarks/speed.py --only loss          # loss curve: stage defaults vs fp32, equal seed, 500 steps

Training: for each model, the same number of optimizer steps at batch 128 done (a) as the lesson does it
(torchvision MNIST with ToTensor through a DataLoader, fp32, eager, `loss.item()` every step) and (b) as the train
stage runs by default (its params from params.yaml, through `training.fit`, with the precision and layout that its
`auto` chooses at params.yaml's budget: timed on this machine, or read from the cache), interleaved A B A B in one
process; median images/s of each and the ratio b/a; then every candidate precision and layout by hand (the stage's
loop with it named, a fresh process each) and how the choice compares with the best of them. Peak memory of each
variant comes from a fresh subprocess.
Sampling: each model's choice as the sample stage makes it, each default sampler setting at the stage's batch size,
and one model evaluation of the UNet2DModel in each candidate against a plain fp32 eager call (interleaved). End to
end: each stage's wall time and peak memory
from metrics/cost/ (written by the last `dvc repro`), and how long a no-op `dvc repro` takes.
Not part of the test suite: timings belong here, never in a test.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.config import load_params
from scratch_diffusion.corruption import corrupt, ddpm_scheduler
from scratch_diffusion.data import describe
from scratch_diffusion.files import write_text
from scratch_diffusion.hardware import cpu_class, cpu_flags, cpu_name, detect
from scratch_diffusion.models import BasicUNet, build_network
from scratch_diffusion.models.unet2d import build_unet
from scratch_diffusion.recipe import stage_choice, train_model
from scratch_diffusion.samplers import evaluation_step, expected_evaluations, generate, sampling_choice
from scratch_diffusion.stage import peak_rss_kib
from scratch_diffusion.tuning import candidates

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data/dataset"
BATCH = 128
CHANNELS, SIDE = 1, 28  # the lesson's networks: MNIST's grey 28 x 28 images
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the lesson's notebook picks it


def machine() -> str:
    """The machine class every figure below belongs to: CPU and its capability, GPU, torch, threads."""
    flags = cpu_flags()
    bf16 = "native bf16" if detect("cpu").native_bf16 else "no native bf16"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()}: {cpu_class(flags)} ({bf16}; torch sees {torch.backends.cpu.get_cpu_capability()}), "
        f"{device}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


# --- the two ways to train ----------------------------------------------------------------------------------------


def lesson_loop(model_name: str, steps: int, seed: int = 0) -> tuple[float, list[float]]:
    """The notebook's loop, as written there (on its `device`): returns (images/s after the first step, losses)."""
    import torchvision
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    dataset = torchvision.datasets.MNIST(
        root=str(DATA), train=True, download=False, transform=torchvision.transforms.ToTensor()
    )
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    net = (
        BasicUNet(CHANNELS, CHANNELS, SIDE)
        if model_name == "basic"
        else build_unet(sample_size=SIDE, channels=CHANNELS)
    ).to(DEVICE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses, start = [], None
    for i, (x, _) in enumerate(loader):
        if i == 1:
            start = time.perf_counter()  # the first step pays one-off costs (allocations, kernel choice)
        x = x.to(DEVICE)
        noise_amount = torch.rand(x.shape[0]).to(DEVICE)
        noisy_x = corrupt(x, noise_amount)
        pred = net(noisy_x) if model_name == "basic" else net(noisy_x, 0).sample  # the lesson's calls
        loss = F.mse_loss(pred, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i + 1 == steps:
            break
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return (steps - 1) * BATCH / (time.perf_counter() - start), losses


def stage_run(model_name: str, steps: int, seed: int = 0, **overrides) -> tuple[float, list[float]]:
    """`steps` optimizer steps through the train stages' own entry (recipe.train_model) with params.yaml's defaults,
    at batch BATCH, plus `overrides` of the stage's section (mixed_precision, channels_last, log_every)."""
    params = load_params(ROOT / "params.yaml")
    section = replace(getattr(params, model_name), batch_size=BATCH, epochs=1, max_steps=steps, **overrides)
    params = replace(params, seed=seed, **{model_name: section})
    with contextlib.redirect_stdout(io.StringIO()):  # the choice and progress lines
        result = train_model(model_name, params, data_root=DATA, desc=f"bench-{model_name}").result
    return result.images_per_s, [loss for _, loss in result.loss_curve]


def peak_rss_mib(call: str) -> float:
    """Peak resident memory of a fresh process that runs `speed.<call>` (imports included)."""
    # VmHWM (via peak_rss_kib), not ru_maxrss: that one is inherited from this (large) process through fork.
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import speed; "
        f"from scratch_diffusion.stage import peak_rss_kib; speed.{call}; "
        "print(peak_rss_kib())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def fresh(call: str):
    """`speed.<call>` evaluated in a fresh process: Accelerate keeps one mixed precision per process."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import speed; "
        f"print(json.dumps(speed.{call}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_call(model_name: str, steps: int, c) -> str:
    """The stage_run call that trains with candidate or choice `c`'s precision and layout named."""
    return f"stage_run({model_name!r}, {steps}, mixed_precision={c.precision!r}, channels_last={c.channels_last})"


def bench_training(models: list[str], steps: int, repeats: int) -> None:
    print(f"\n## Training: {steps} steps at batch {BATCH}, interleaved, {repeats} repeats (median images/s)")
    params = load_params(ROOT / "params.yaml")
    for name in models:
        p = getattr(params, name)
        # What the stage runs with at params.yaml's own budget: `auto` timed now or read from the cache, by the
        # same entry train_model resolves it with; the short runs below then use that choice explicitly.
        choice = stage_choice(name, replace(params, **{name: replace(p, batch_size=BATCH)}), DATA)
        print(choice.line(f"{name:7s} train stage", torch.get_num_threads()))
        chosen = {"mixed_precision": choice.precision, "channels_last": choice.channels_last}
        stage_run(name, 3, **chosen)  # warm both paths up (allocator, oneDNN kernel choice) outside the timings
        lesson_loop(name, 3)
        a, b = [], []
        for _ in range(repeats):
            a.append(lesson_loop(name, steps)[0])
            b.append(stage_run(name, steps, **chosen)[0])
        ma, mb = statistics.median(a), statistics.median(b)
        # The stage's memory with its chosen precision and layout (5 steps alone would take the rule's).
        mem_a, mem_b = peak_rss_mib(f"lesson_loop({name!r}, 5)"), peak_rss_mib(stage_call(name, 5, choice))
        print(f"{name:7s} lesson loop {ma:7.1f} img/s (runs: {', '.join(f'{v:.0f}' for v in a)}), peak {mem_a:.0f} MiB")
        print(f"{name:7s} train stage {mb:7.1f} img/s (runs: {', '.join(f'{v:.0f}' for v in b)}), peak {mem_b:.0f} MiB")
        print(f"{name:7s} ratio stage / lesson: {mb / ma:.2f}x")
        # Each candidate by hand, the stage's loop with that precision and layout named (a fresh process each:
        # Accelerate keeps one mixed precision per process), against what `auto` chose.
        hand = {}
        for c in candidates(detect(DEVICE.type), "auto", "auto", training=True):
            hand[c.label] = statistics.median(fresh(stage_call(name, steps, c))[0] for _ in range(repeats))
        best = max(hand, key=hand.get)
        rates = ", ".join(f"{label} {rate:.1f}" for label, rate in hand.items())
        print(f"{name:7s} by hand (img/s): {rates}; best {best}")
        print(f"{name:7s} auto chose {choice.label}: {hand[choice.label] / hand[best]:.2f}x the best by hand")


def bench_loss(models: list[str], steps: int) -> None:
    """The speed levers must not change what is learned: mean loss over the last fifth, defaults vs fp32."""
    print(f"\n## Loss curve: {steps} steps, equal seed, stage defaults vs fp32 contiguous (mean of the last fifth)")
    for name in models:
        _, fast = fresh(f"stage_run({name!r}, {steps}, log_every=1)")
        _, ref = fresh(f"stage_run({name!r}, {steps}, log_every=1, mixed_precision='fp32', channels_last=False)")
        tail = max(1, steps // 5)
        mf, mr = statistics.fmean(fast[-tail:]), statistics.fmean(ref[-tail:])
        print(f"{name:7s} defaults {mf:.5f}  fp32 {mr:.5f}  difference {100 * (mf - mr) / mr:+.2f}%")


def bench_sampling(repeats: int) -> None:
    params = load_params(ROOT / "params.yaml")
    sp, u = replace(params.sample, n=params.sample.size(describe(DATA).n_test)), params.unet2d  # as the stage
    bs = sp.batch_size
    print(f"\n## Sampling: one batch of {bs} per default setting (untrained weights)")
    torch.manual_seed(0)
    nets = {name: build_network(name, u, CHANNELS, SIDE).eval() for name in ("basic", "unet2d")}
    nets = {name: net.to(DEVICE) for name, net in nets.items()}
    # Each model's precision and layout as the sample stage chooses them for its default settings (timed or cached).
    batches = -(-sp.n // bs)
    choices = {}
    for name, net in nets.items():
        calls = sum(batches * expected_evaluations(s.sampler, s.steps) for s in sp.settings if s.model == name)
        choices[name] = sampling_choice(net, sp.precision, sp.channels_last, DEVICE, batch=bs, evaluations=calls)
        print(choices[name].line(f"sample {name}", torch.get_num_threads()))
    config = ddpm_scheduler(
        u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end, PREDICTION_TYPES[params.objective]
    ).config
    for s in sp.settings:
        corruption = "toy" if s.sampler == "toy" else "ddpm"
        start = time.perf_counter()
        _, nfe = generate(
            nets[s.model],
            s.sampler,
            s.steps,
            bs,
            batch_size=bs,
            seed=0,
            corruption=corruption,
            trained_config=config,
            eta=s.eta,
            precision=choices[s.model].precision,
            channels_last=choices[s.model].channels_last,
            device=DEVICE,
        )
        seconds = time.perf_counter() - start
        print(f"{s.name:24s} NFE {nfe:4d}  {bs / seconds:8.1f} img/s  {1000 * seconds / bs:7.1f} ms/image")

    # One UNet2DModel evaluation at the stage's batch: a plain fp32 eager call vs each candidate (the sample stage's
    # evaluation step, tuning's own), interleaved.
    x, t = torch.randn(bs, CHANNELS, SIDE, SIDE, device=DEVICE), torch.full((bs,), 500, device=DEVICE)
    # The same weights, bare (no denoiser wrapper), in PyTorch's default layout.
    plain = copy.deepcopy(nets["unet2d"].unet).to(DEVICE, memory_format=torch.contiguous_format).eval()

    def plain_call():
        with torch.no_grad():
            plain(x, t)

    step = evaluation_step(nets["unet2d"], bs, DEVICE)
    calls = {"plain fp32": plain_call}
    calls.update({c.label: step(c) for c in candidates(detect(DEVICE.type), "auto", "auto", training=False)})
    timings = {name: [] for name in calls}
    for f in calls.values():
        f()
    for _ in range(repeats):
        for name, f in calls.items():
            start = time.perf_counter()
            f()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(bs / (time.perf_counter() - start))
    rates = {name: statistics.median(v) for name, v in timings.items()}
    chosen = choices["unet2d"].label
    print(
        f"UNet2DModel evaluation, batch {bs} (img/s): "
        + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
        + f"; the stage's {chosen} / plain fp32: {rates[chosen] / rates['plain fp32']:.2f}x"
    )


def bench_end_to_end() -> None:
    print("\n## End to end: the last `dvc repro` (metrics/cost/<stage>.json)")
    costs = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "metrics/cost").glob("*.json"))}
    if not costs:
        print("no metrics/cost/*.json yet: run `dvc repro` first")
        return
    order = ["download", "train-basic", "train-unet2d", "train-classifier", "visualize-schedule", "sample", "compare"]
    print("| stage | wall | peak memory |\n|---|---|---|")
    for stage in sorted(costs, key=lambda s: order.index(s) if s in order else len(order)):
        c = costs[stage]
        print(f"| {stage} | {c['wall_s'] / 60:.1f} min | {c['peak_rss_mib']:.0f} MiB |")
    total = sum(c["wall_s"] for c in costs.values())
    print(f"| all | {total / 60:.1f} min | {max(c['peak_rss_mib'] for c in costs.values()):.0f} MiB (max) |")
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "--dry"], cwd=ROOT, capture_output=True, text=True)
    noop = time.perf_counter() - start
    state = "nothing to do" if "Running stage" not in proc.stdout else "stages would run (workspace changed)"
    print(f"`dvc repro --dry`: {noop:.1f} s ({state})")


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=("train", "loss", "sample", "end-to-end"),
        action="append",
        help="run only these parts (repeatable); default: train, sample, end-to-end",
    )
    parser.add_argument("--models", nargs="+", default=["basic", "unet2d"], choices=("basic", "unet2d"))
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (default: 60 basic, 8 unet2d)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-steps", type=int, default=500)
    parser.add_argument(
        "--report", action="store_true", help="also write what it prints to docs/performance/<machine class>.md"
    )
    args = parser.parse_args()
    for name, lo, hi in (("steps", 0, 100_000), ("repeats", 1, 100), ("loss_steps", 1, 100_000)):
        if not lo <= getattr(args, name) <= hi:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: {lo}..{hi}")
    if not (DATA / "MNIST/raw").is_dir():
        refuse(f"{DATA}/MNIST/raw not found: run `dvc repro download` first")
    parts = args.only or ["train", "sample", "end-to-end"]
    if args.report:
        report = io.StringIO()
        with contextlib.redirect_stdout(Tee(sys.stdout, report)):
            run_parts(args, parts)
        command = " ".join(["python benchmarks/speed.py", *sys.argv[1:]])
        text = f"# Benchmark: {machine_class()}\n\nWritten by `{command}`; each figure is this machine's.\n\n"
        write_text(ROOT / "docs/performance" / f"{machine_class().lower()}.md", f"{text}```\n{report.getvalue()}```\n")
    else:
        run_parts(args, parts)


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def machine_class() -> str:
    """AVX2, AVX512-BF16, ... for a CPU run; the GPU's name for a GPU run."""
    return torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else cpu_class(cpu_flags())


def run_parts(args, parts: list[str]) -> None:
    print(f"# benchmarks/speed.py\n{machine()}")
    if "train" in parts:
        for name in args.models:
            bench_training([name], args.steps or (60 if name == "basic" else 8), args.repeats)
    if "loss" in parts:
        bench_loss(args.models, args.loss_steps)
    if "sample" in parts:
        bench_sampling(args.repeats)
    if "end-to-end" in parts:
        bench_end_to_end()
    print(f"\npeak memory of this process: {peak_rss_kib() / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
