"""dipddpm-bench: how fast DIP training and diffusion sampling run on this machine.

One command, one module (about 570 lines): each measure below is a short function, and they
share the interleaved-rounds timer and the table writer.

One run measures, interleaved round by round so that a busy machine slows every
variant alike (medians over ``--repeats`` rounds):

- ceiling: dense fp32 matmul GFLOP/s, the machine's practical peak;
- dip: training steps of each backbone through ``fit_dip`` (ours: jitter, EMA and
  evaluation at eval points included), FLOPs per step (forward + backward, counted by
  torch.utils.flop_counter), achieved GFLOP/s and its share of the ceiling; for skip
  networks also a plain PyTorch notebook loop (``plain``) and the execution options
  (channels-last, bf16 autocast, torch.compile), each as a speed ratio;
- eval: wall time per evaluation point and its share of the wall time at ``eval_every``;
- replicas: K networks in one ``fit_dip_replicas`` call (vmap and loop modes) against
  K sequential ``fit_dip`` runs, per replica-step;
- sampling: ancestral DDPM sampling ms per step of small eps-nets at batch 1 and 64.

Prints a table and writes bench.csv (device, torch version and threads on every row).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dipddpm.diffusion import sample
from dipddpm.diffusion.schedule import linear_schedule
from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.errors import ConfigError
from dipddpm.io import write_csv_atomic
from dipddpm.models import build_backbone, size_requirement
from dipddpm.replicas import fit_dip_replicas, resolve_mode
from dipddpm.runtime import resolve_device, synchronize
from dipddpm.sweep import config_dir

COLUMNS = (
    "section", "backbone", "size", "variant", "batch", "steps", "ms_per_step", "steps_per_second",
    "gflop_per_step", "gflops", "ceiling_gflops", "ceiling_share", "ratio", "ratio_basis",
    "eval_ms", "eval_share", "device", "device_name", "torch", "threads", "note",
)
DEFAULT_CASES = (("skip", 128), ("skip", 256), ("cnn", 128), ("unet", 128))
QUICK_CASES = (("skip", 64), ("cnn", 64))
CODE_CHANNELS, OUT_CHANNELS = 32, 3
DIP_DEFAULTS = dict(lr=0.01, reg_noise_std=1 / 30, ema=0.99)
SAMPLING_NETS = ("unet_ln", "unet_res")
SAMPLING_SIDE = 28
REPLICA_VARIANTS = ("vmap", "loop", "sequential")


@dataclass
class Options:
    cases: list
    steps: int
    repeats: int
    device: torch.device
    out: Path
    replicas: int
    eval_every: int = 50
    variants: bool = True
    compile: bool = True
    ceiling_size: int = 2048
    sampling_steps: int = 10
    sampling_batches: tuple = (1, 64)
    notes: list = field(default_factory=list)


def backbone_config(name: str):
    """The preset conf/backbone/<name>.yaml (skip, skip_mnist, cnn, unet, ...)."""
    path = config_dir() / "backbone" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("--backbones", name, "names of files in conf/backbone")
    return OmegaConf.load(path)


class PlainConcat(nn.Module):
    """Concatenate the outputs of two branches along channels."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return torch.cat([self.first(x), self.second(x)], dim=1)


def plain_skip_net(in_channels: int, out_channels: int, down: list, up: list, skip: list) -> nn.Module:
    """The DIP skip hourglass written out as a notebook would: reflection pad + conv,
    BatchNorm, LeakyReLU(0.2); stride-2 downsampling, bilinear upsampling, 1x1 skips."""

    def conv_bn_act(c_in, c_out, kernel, stride=1):
        pad = [nn.ReflectionPad2d(kernel // 2)] if kernel > 1 else []
        return pad + [nn.Conv2d(c_in, c_out, kernel, stride=stride), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]

    def level(i, depth):
        last = i == len(down) - 1
        deeper = conv_bn_act(depth, down[i], 3, stride=2) + conv_bn_act(down[i], down[i], 3)
        if not last:
            deeper.append(level(i + 1, down[i]))
        deeper.append(nn.Upsample(scale_factor=2, mode="bilinear"))
        deeper = nn.Sequential(*deeper)
        merged = skip[i] + (down[i] if last else up[i + 1])
        head = [PlainConcat(nn.Sequential(*conv_bn_act(depth, skip[i], 1)), deeper)] if skip[i] else [deeper]
        return nn.Sequential(*head, nn.BatchNorm2d(merged), *conv_bn_act(merged, up[i], 3),
                             *conv_bn_act(up[i], up[i], 1))

    return nn.Sequential(level(0, in_channels), nn.Conv2d(up[0], out_channels, 1), nn.Sigmoid())


PLAIN_SKIP_KEYS = dict(filter_size_down=3, filter_size_up=3, filter_skip_size=1, upsample_mode="bilinear",
                       downsample_mode="stride", pad="reflection", act="LeakyReLU", act_slope=0.2,
                       need_sigmoid=True, need_bias=True, need1x1_up=True)


def plain_net_for(cfg, in_channels: int, out_channels: int) -> nn.Module | None:
    """plain_skip_net for a skip config with the standard options, else None."""
    if cfg.name != "skip" or any(cfg.get(k, v) != v for k, v in PLAIN_SKIP_KEYS.items()):
        return None
    return plain_skip_net(in_channels, out_channels, list(cfg.num_channels_down), list(cfg.num_channels_up),
                          list(cfg.num_channels_skip))


def plain_steps(net, code, target, steps: int, device) -> float:
    """The plain notebook loop: jitter, forward, MSE, backward, Adam, output average,
    loss.item() every step. Returns seconds for ``steps`` steps."""
    optimizer = torch.optim.Adam(net.parameters(), lr=DIP_DEFAULTS["lr"])
    criterion = nn.MSELoss()
    noise = code.clone()
    average = None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        out = net(code + noise.normal_() * DIP_DEFAULTS["reg_noise_std"])
        loss = criterion(out, target)
        loss.backward()
        optimizer.step()
        detached = out.detach()
        average = detached if average is None else average * DIP_DEFAULTS["ema"] + detached * (1 - DIP_DEFAULTS["ema"])
        loss.item()
    synchronize(device)
    return time.perf_counter() - start


def case_tensors(size: int, device) -> tuple:
    """(clean, noisy target, code) of a benchmark case, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand((1, OUT_CHANNELS, size, size), generator=generator)
    target = (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    code = 0.1 * torch.rand((1, CODE_CHANNELS, size, size), generator=generator)
    return clean.to(device), target.to(device), code.to(device)


def _plain_worker(connection, backbone: str, size: int, threads: int, device: str) -> None:
    """Serve plain_steps timings: say "ready" once set up (so that its start-up does not
    overlap any timing), then receive a step count, send seconds per step; None ends."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    _, target, code = case_tensors(size, device)
    net = plain_net_for(backbone_config(backbone), CODE_CHANNELS, OUT_CHANNELS).to(device)
    plain_steps(net, code, target, 1, device)
    connection.send("ready")
    while (steps := connection.recv()) is not None:
        connection.send(plain_steps(net, code, target, steps, device) / steps)


class PlainWorker:
    """The plain baseline in a fresh process, so that nothing this process has switched
    on (the allocator setting of fit_dip, backend flags) reaches it: a notebook's view."""

    def __init__(self, backbone: str, size: int, device: torch.device):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_plain_worker, daemon=True,
                                       args=(child, backbone, size, torch.get_num_threads(), str(device)))
        self.process.start()
        self.connection.recv()

    def seconds_per_step(self, steps: int) -> float:
        self.connection.send(steps)
        return self.connection.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.connection.send(None)
            self.process.join(timeout=30)


def train_step_flops(net, code, target) -> int:
    """FLOPs of one forward + backward pass (matmul and convolution FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        loss = torch.mean((net(code) - target) ** 2)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def forward_flops(net, *inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()


def matmul_seconds(size: int, device, repeats: int = 3) -> float:
    """Median seconds of one size x size fp32 matmul."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


class DipCase:
    """One backbone at one size: its inputs, FLOPs per step and the variants to time."""

    def __init__(self, name: str, size: int, options: Options):
        self.name, self.size, self.options = name, size, options
        self.cfg = backbone_config(name)
        device = options.device
        self.clean, self.target, self.code = case_tensors(size, device)
        torch.manual_seed(0)
        self.net = build_backbone(self.cfg, CODE_CHANNELS, OUT_CHANNELS).to(device)
        self.flops = train_step_flops(self.net, self.code, self.target)
        self.plain = None
        if plain_net_for(self.cfg, CODE_CHANNELS, OUT_CHANNELS) is not None:
            self.plain = PlainWorker(name, size, device)
        self.settings = DipSettings(**DIP_DEFAULTS, eval_every=options.eval_every, cudnn_benchmark=True)
        self.variant_nets: dict[str, nn.Module] = {}
        self.eval_costs: list[tuple[float, float]] = []

    def variants(self, first_of_family: bool) -> list[str]:
        names = ["ours"]
        if self.plain is not None:
            names.append("plain")
        if self.options.variants and first_of_family and self.cfg.name == "skip":
            names += ["channels_last", "autocast_bf16"]
            if self.options.compile:
                names.append("compile")
        return names

    def _settings_for(self, variant: str) -> DipSettings:
        extra = {"channels_last": dict(channels_last=True), "autocast_bf16": dict(autocast="bf16"),
                 "compile": dict(compile=True)}.get(variant, {})
        return replace(self.settings, **extra)

    def _net_for(self, variant: str) -> nn.Module:
        if variant == "ours":
            return self.net
        if variant not in self.variant_nets:
            torch.manual_seed(0)
            self.variant_nets[variant] = build_backbone(self.cfg, CODE_CHANNELS, OUT_CHANNELS).to(self.options.device)
        return self.variant_nets[variant]

    def run(self, variant: str, steps: int) -> float:
        """Seconds per step of ``steps`` training steps of ``variant``."""
        if variant == "plain":
            return self.plain.seconds_per_step(steps)
        stage = Stage(index=0, steps=steps, net_input=self.code, target=self.target)
        generator = torch.Generator(device=self.options.device).manual_seed(1)
        result = fit_dip(self._net_for(variant), [stage], self._settings_for(variant), clean=self.clean,
                         generator=generator)
        if variant == "ours" and steps == self.options.steps:
            train_seconds = result.seconds - result.eval_seconds
            self.eval_costs.append((result.eval_seconds / max(result.evaluations, 1), train_seconds / steps))
        return result.seconds / result.steps_run


class ReplicaCase:
    """K copies of a skip case's network: one batched run against K sequential runs."""

    def __init__(self, case: DipCase, count: int):
        self.case, self.count = case, count
        self.nets = []
        for k in range(count):
            torch.manual_seed(k)
            self.nets.append(build_backbone(case.cfg, CODE_CHANNELS, OUT_CHANNELS).to(case.options.device))
        self.codes = [case.code * (1 + 0.1 * k) for k in range(count)]

    def _stages(self, k: int, steps: int) -> list[Stage]:
        return [Stage(index=0, steps=steps, net_input=self.codes[k], target=self.case.target)]

    def _generators(self):
        return [torch.Generator(device=self.case.options.device).manual_seed(k) for k in range(self.count)]

    def run(self, variant: str, steps: int) -> float:
        """Seconds per replica-step: one fit_dip_replicas call in mode ``variant`` (vmap,
        loop) or K fit_dip calls (sequential)."""
        settings, clean = self.case.settings, self.case.clean
        generators = self._generators()
        if variant != "sequential":
            results = fit_dip_replicas(self.nets, [self._stages(k, steps) for k in range(self.count)], settings,
                                       clean=clean, generators=generators, mode=variant)
            return results[0].seconds / (steps * self.count)
        total = 0.0
        for k in range(self.count):
            total += fit_dip(self.nets[k], self._stages(k, steps), settings, clean=clean,
                             generator=generators[k]).seconds
        return total / (steps * self.count)


def measure_rounds(jobs: dict, steps: int, repeats: int) -> dict:
    """jobs: name -> callable(steps) returning seconds per step. One warm-up call of each,
    then ``repeats`` rounds in which every job runs once; returns name -> list of timings."""
    for job in jobs.values():
        job(3)
    timings = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            timings[name].append(job(steps))
    return timings


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _row(section, backbone="", size="", variant="", batch=1, steps="", seconds=None, flops=None, ceiling=None,
         ratio=None, ratio_basis="", eval_ms=None, eval_share=None, note="") -> dict:
    row = {"section": section, "backbone": backbone, "size": size, "variant": variant, "batch": batch,
           "steps": steps, "note": note, "ratio_basis": ratio_basis}
    if seconds is not None:
        row["ms_per_step"] = 1e3 * seconds
        row["steps_per_second"] = 1.0 / seconds
    if flops is not None:
        row["gflop_per_step"] = flops / 1e9
        if seconds is not None:
            row["gflops"] = flops / seconds / 1e9
            if ceiling:
                row["ceiling_share"] = row["gflops"] / ceiling
    if ceiling:
        row["ceiling_gflops"] = ceiling
    row["ratio"], row["eval_ms"], row["eval_share"] = ratio, eval_ms, eval_share
    return row


def bench_dip(options: Options) -> list[dict]:
    """The ceiling row (matmul timed between the training rounds), then the training rows
    (dip, eval, replicas)."""
    cases, seen_families = [], set()
    for name, size in options.cases:
        cfg = backbone_config(name)
        multiple, minimum = size_requirement(cfg)
        if size % multiple or size < minimum:
            options.notes.append(f"{name} at {size}: skipped (needs a multiple of {multiple}, at least {minimum})")
            continue
        case = DipCase(name, size, options)
        cases.append((case, case.variants(name not in seen_families)))
        seen_families.add(name)
    ceiling_key = ("ceiling", "matmul")
    jobs = {ceiling_key: lambda steps: matmul_seconds(options.ceiling_size, options.device)}
    for case, variants in cases:
        for variant in variants:
            jobs[(case.name, case.size, variant)] = lambda steps, c=case, v=variant: c.run(v, steps)
    replica_case = None
    skip_cases = [case for case, _ in cases if case.cfg.name == "skip"]
    if options.replicas > 1 and skip_cases:
        replica_case = ReplicaCase(skip_cases[0], options.replicas)
        for variant in REPLICA_VARIANTS:
            jobs[("replicas", variant)] = lambda steps, v=variant: replica_case.run(v, steps)
    try:
        timings = measure_rounds(jobs, options.steps, options.repeats)
    finally:
        for case, _ in cases:
            if case.plain is not None:
                case.plain.close()
    matmul_flops = 2 * options.ceiling_size**3
    matmul = statistics.median(timings[ceiling_key])
    ceiling = matmul_flops / matmul / 1e9
    rows = [_row("ceiling", "matmul", options.ceiling_size, "fp32", 1, "", matmul, matmul_flops, ceiling,
                 note="dense matmul: the practical peak")]
    for case, variants in cases:
        median = {v: statistics.median(timings[(case.name, case.size, v)]) for v in variants}
        for variant in variants:
            if variant == "ours" and "plain" in median:
                ratio, basis = median["plain"] / median["ours"], "plain ms / ours ms"
            elif variant == "ours":
                ratio, basis = None, ""
            else:
                ratio, basis = median["ours"] / median[variant], f"ours ms / {variant} ms"
            note = "notebook loop, plain nn modules, own process" if variant == "plain" else ""
            rows.append(_row("dip", case.name, case.size, variant, 1, options.steps, median[variant], case.flops,
                             ceiling, ratio, basis, note=note))
        per_eval = statistics.median(e for e, _ in case.eval_costs)
        per_step = statistics.median(s for _, s in case.eval_costs)
        share = per_eval / (options.eval_every * per_step + per_eval)
        rows.append(_row("eval", case.name, case.size, f"eval_every={options.eval_every}", 1, "", None, None, None,
                         note="PSNR on device + SSIM per evaluation point", eval_ms=1e3 * per_eval, eval_share=share))
    if replica_case is not None:
        base = replica_case.case
        median = {v: statistics.median(timings[("replicas", v)]) for v in REPLICA_VARIANTS}
        default_mode = resolve_mode("auto", options.device)
        for variant in REPLICA_VARIANTS:
            ratio = median["sequential"] / median[variant] if variant != "sequential" else None
            note = "ms per replica-step" + (" (replica_mode auto)" if variant == default_mode else "")
            rows.append(_row("replicas", base.name, base.size, f"{variant} K={replica_case.count}",
                             replica_case.count, options.steps, median[variant], base.flops, ceiling, ratio,
                             f"sequential ms / {variant} ms" if ratio else "", note=note))
    return rows


def bench_sampling(options: Options, ceiling: float) -> list[dict]:
    """Ancestral sampling ms per step at each batch size for the small eps-nets."""
    rows = []
    schedule = linear_schedule(1000, 1e-4, 0.02)
    for name in SAMPLING_NETS:
        cfg = OmegaConf.load(config_dir() / "eps_net" / f"{name}.yaml")
        if "image_size" in cfg:
            cfg.image_size = SAMPLING_SIDE
        torch.manual_seed(0)
        model = build_backbone(cfg, 1, 1).to(options.device).eval()
        per_batch = {}
        for batch in options.sampling_batches:
            shape = (batch, 1, SAMPLING_SIDE, SAMPLING_SIDE)
            t = torch.full((batch,), 500, dtype=torch.long, device=options.device)
            flops = forward_flops(model, torch.zeros(shape, device=options.device), t)
            generator = torch.Generator(device=options.device).manual_seed(0)
            sample(model, schedule, shape, t_start=1, generator=generator)
            times = []
            for _ in range(options.repeats):
                result = sample(model, schedule, shape, t_start=options.sampling_steps - 1, generator=generator)
                times.append(result.seconds / result.model_calls)
            per_batch[batch] = (statistics.median(times), flops)
        single = per_batch.get(1, (None, None))[0]
        for batch, (seconds, flops) in per_batch.items():
            ratio = single * batch / seconds if single and batch > 1 else None
            rows.append(_row("sampling", name, SAMPLING_SIDE, "ancestral", batch, options.sampling_steps, seconds,
                             flops, ceiling, ratio, "batch-1 ms x batch / ms" if ratio else "",
                             note="ms per sampling step (one model call)"))
    return rows


def run_bench(options: Options) -> list[dict]:
    """All measurements; returns the rows (also written to options.out / bench.csv)."""
    rows = bench_dip(options)
    rows += bench_sampling(options, rows[0]["ceiling_gflops"])
    rows += [_row("note", note=text) for text in options.notes]
    env = environment(options.device)
    for row in rows:
        row.update(env)
    write_csv_atomic(options.out / "bench.csv", [{k: _cell(row.get(k)) for k in COLUMNS} for row in rows], COLUMNS)
    return rows


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows."""
    shown = ("section", "backbone", "size", "variant", "batch", "ms_per_step", "steps_per_second", "gflop_per_step",
             "gflops", "ceiling_share", "ratio", "eval_ms", "eval_share", "note")
    formats = {"ms_per_step": "{:.1f}", "steps_per_second": "{:.2f}", "gflop_per_step": "{:.3g}", "gflops": "{:.1f}",
               "ceiling_share": "{:.0%}", "ratio": "{:.2f}x", "eval_ms": "{:.2f}", "eval_share": "{:.2%}"}
    table = [[name for name in shown]]
    for row in rows:
        cells = []
        for name in shown:
            value = row.get(name)
            if value is None or value == "":
                cells.append("")
            elif name in formats and isinstance(value, (int, float)):
                cells.append(formats[name].format(value))
            else:
                cells.append(str(value))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(shown) - 1)]
    lines = []
    for cells in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
    return "\n".join(line.rstrip() for line in lines)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv) -> Options:
    parser = argparse.ArgumentParser(prog="dipddpm-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", type=_name_list, help="backbone presets (conf/backbone names), e.g. skip,cnn")
    parser.add_argument("--sizes", type=_int_list, help="image sides, e.g. 128,256")
    parser.add_argument("--steps", type=int, help="training steps per timed call (default 8, quick 3)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds; medians are reported (default 3, quick 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.csv")
    parser.add_argument("--replicas", type=int, help="K for the replicas comparison (default 4, quick 2; 1 = off)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluation interval for the eval share")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-variants", action="store_true", help="leave channels-last, bf16 and compile out")
    parser.add_argument("--ceiling-size", type=int, help="matmul side for the ceiling (default 2048; cuda 8192)")
    parser.add_argument("--sampling-steps", type=int, help="sampling steps per timed call (default 10)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps: about a minute")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.backbones or args.sizes:
        cases = [(b, s) for b in (args.backbones or ["skip", "cnn", "unet"]) for s in (args.sizes or [128])]
    else:
        cases = list(QUICK_CASES if args.quick else DEFAULT_CASES)
    quick = args.quick
    return Options(
        cases=cases,
        steps=args.steps or (3 if quick else 8),
        repeats=args.repeats or (2 if quick else 3),
        device=device,
        out=Path(args.out),
        replicas=args.replicas if args.replicas is not None else (2 if quick else 4),
        eval_every=args.eval_every,
        variants=not args.no_variants,
        compile=not (args.no_compile or quick),
        ceiling_size=args.ceiling_size or (8192 if device.type == "cuda" else (1024 if quick else 2048)),
        sampling_steps=args.sampling_steps or (3 if quick else 10),
    )


def cli(argv: list[str] | None = None) -> int:
    """Console entry point of dipddpm-bench."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        print(f"dipddpm-bench: error: {error}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    try:
        rows = run_bench(options)
    except ConfigError as error:
        print(f"dipddpm-bench: error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    env = environment(options.device)
    print(f"\n{env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads; "
          f"{options.steps} steps x {options.repeats} rounds; {time.perf_counter() - began:.0f} s; "
          f"written {options.out / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
