"""Cost of a flow-matching speech DPO step against its floor, and the real-time factor of restoration.

The floor of a Diffusion-DPO step on a flow model (ALGORITHMS.md §7) is a supervised LoRA flow-matching step on
the same 2B spectrograms (chosen and rejected) plus ONE no-grad forward of the base network (the reference pass:
LoRA disabled, no second copy). Four variants run on the same batch, the same LoRA and the same optimizer,
through ``FlowSpeechAdapter.scores`` + ``compute_loss`` exactly as the trainer calls them:

- ``supervised``: policy forward on the 2B rows, mean flow-matching error, backward, AdamW step;
- ``ref_forward``: the reference pass alone (``no_grad``, ``lora_disabled``);
- ``dpo``: reference pass first (as the trainer), policy pass, the Diffusion-DPO loss, backward, step;
- ``dpo_cached_ref``: Diffusion-DPO with the reference errors given (cached), no reference pass.

The batch is made by ``FlowSpeechAdapter.collate`` from wav files (so it holds the real STFT layout); collation
itself is not timed (it is the same for every variant).

Judged on CPU time (``time.process_time``) of ONE thread: the work of a step, which other jobs on a shared
machine do not inflate (and one thread has no OpenMP spin-wait). One round = one step of each variant back to
back, the order alternating between rounds; a ratio is the median over rounds of that round's own ratio (the
ratio of the medians is reported too). Wall times on ``--threads`` threads (2: the target machine's cores) are
reported beside them.

Restoration: :func:`~mm_align.audio.flow_enhancer.restore` of a 10 s input with the default sampler (8 Euler
steps) and chunking (8 s chunks, 1 s overlap): the real-time factor (time / audio duration) by the wall clock on
``--threads`` threads, and in CPU time on one thread.

    python benchmarks/speech_flow_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timing import format_times, median_of_ratios, medians, per_round_ratios, time_rounds, warm_up

VARIANTS = ("supervised", "ref_forward", "dpo", "dpo_cached_ref")
SR = 16_000
MODEL = dict(channels=(16, 32, 64), num_res_blocks=1, norm_groups=4)  # the FlowEnhancer defaults
PAIRS, CROP_SECONDS, LORA_R = 2, 1.0, 8


def _write_pairs(root: Path, n: int, seconds: float) -> Path:
    """``n`` pairs of harmonic-tone clips (degraded, chosen, rejected) and their speech_pairs manifest."""
    from mm_align.audio.io import save_audio

    g = torch.Generator().manual_seed(0)
    rows = []
    length = int(seconds * SR)
    t = torch.arange(length) / SR
    for i in range(n):
        clean = sum(0.15 / k * torch.sin(2 * math.pi * k * (120.0 + 30 * i) * t) for k in range(1, 6))
        for name, level in (("deg", 0.08), ("ch", 0.01), ("rj", 0.04)):
            save_audio(root / f"{name}{i}.wav", clean + level * torch.randn(length, generator=g), SR)
        rows.append({"id": f"p{i}", "degraded": f"deg{i}.wav", "chosen": f"ch{i}.wav", "rejected": f"rj{i}.wav"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


class Bench:
    """The adapter, the LoRA'd FlowEnhancer, one optimizer and one fixed batch; one method per variant."""

    def __init__(self, workdir: Path) -> None:
        from mm_align.audio.flow_enhancer import FlowEnhancer
        from mm_align.audio.speech_adapter import FlowSpeechAdapter, FlowSpeechConfig
        from mm_align.audio.speech_records import read_speech_pairs

        from mm_align.lora import LoraSettings, add_lora

        torch.manual_seed(0)
        FlowEnhancer(**MODEL).save_pretrained(workdir / "model")
        manifest = _write_pairs(workdir, PAIRS, CROP_SECONDS + 0.5)
        self.adapter = FlowSpeechAdapter(FlowSpeechConfig(pretrained=str(workdir / "model"),
                                                          crop_seconds=CROP_SECONDS))
        self.adapter.base_dir = workdir
        self.params = sum(p.numel() for p in self.adapter.model.parameters())
        self.model = add_lora(self.adapter.model, LoraSettings(r=LORA_R), self.adapter.lora_target_modules)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-5)
        records = read_speech_pairs(manifest).records
        self.batch = self.adapter.collate(records, list(range(len(records))))
        with torch.no_grad():
            self.cached_ref = self._reference()

    def _policy(self):
        return self.adapter.scores(self.batch, self.model)

    def _reference(self):
        from mm_align.lora import lora_disabled

        with torch.no_grad(), lora_disabled(self.model):
            return self.adapter.scores(self.batch, self.model).detach()

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()

    def supervised(self) -> None:
        s = self._policy()
        self._update(torch.cat([s.chosen, s.rejected]).mean())

    def ref_forward(self) -> None:
        self._reference().chosen.sum().item()

    def dpo(self) -> None:
        from mm_align.losses.registry import compute_loss

        reference = self._reference()  # first, as the trainer does: its activations are gone before the policy's
        self._update(compute_loss(["diffusion_dpo"], None, self._policy(), reference).loss)

    def dpo_cached_ref(self) -> None:
        from mm_align.losses.registry import compute_loss

        self._update(compute_loss(["diffusion_dpo"], None, self._policy(), self.cached_ref).loss)

    def step(self, variant: str) -> None:
        getattr(self, variant)()


def measure_restore(seconds: float = 10.0, reps: int = 3, threads: int = 2) -> dict[str, Any]:
    """Restoring a ``seconds`` input with the default restore settings (a fresh random model): the wall time on
    ``threads`` threads (the real-time factor asked for) and the CPU time on one thread (the work, which a shared
    machine does not inflate)."""
    from mm_align.audio.flow_enhancer import FlowEnhancer, restore

    torch.manual_seed(0)
    model = FlowEnhancer(**MODEL).eval()
    wave = 0.1 * torch.randn(int(seconds * SR), generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {"seconds_of_audio": seconds, "steps": 8, "method": "euler", "chunk_seconds": 8.0,
                           "overlap_seconds": 1.0, "threads": threads}
    for label, n, clock in (("wall", threads, time.perf_counter), ("cpu_1thread", 1, time.process_time)):
        torch.set_num_threads(n)
        restore(model, wave[:SR], SR)  # warm-up
        times = []
        for _ in range(reps):
            t0 = clock()
            restore(model, wave, SR)
            times.append(clock() - t0)
        out[f"{label}_s"] = times
        out[f"rtf_{label}"] = statistics.median(times) / seconds
    return out


def _rounds(bench: Bench, reps: int, clock: Callable[[], float], log: Callable[[str], None], label: str,
            ) -> dict[str, list[float]]:
    def progress(r: int, times: dict[str, list[float]]) -> None:
        log(f"{label} round {r + 1}/{reps}: " + format_times({v: t[-1] for v, t in times.items()}))

    return time_rounds(bench.step, VARIANTS, reps, clock=clock, after_round=progress)


def _judged(t: Mapping[str, float]) -> dict[str, float]:
    return {"dpo / (supervised + ref_forward)": t["dpo"] / (t["supervised"] + t["ref_forward"]),
            "dpo_cached_ref / supervised": t["dpo_cached_ref"] / t["supervised"]}


def _ratios(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(median over rounds of each round's ratio, ratio of the medians)."""
    return median_of_ratios(per_round_ratios(times, _judged)), _judged(medians(times))


def measure(reps: int = 15, wall_reps: int = 7, warmup: int = 2, threads: int = 2,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times of every variant and of restoration; targets judged.

    Judged: one thread, CPU time (``time.process_time``): the work of each step, which other jobs on a shared
    machine do not inflate (with one thread there is no OpenMP spin-wait either). One round = one step of each
    variant back to back, the order alternating; a ratio is the median over rounds of the round's own ratio
    (the ratio of the medians is reported too). Reported alongside: wall time on ``threads`` threads.
    """
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        torch.set_num_threads(1)
        warm_up(bench.step, VARIANTS, warmup)
        cpu = _rounds(bench, reps, time.process_time, log, "cpu, 1 thread")
        torch.set_num_threads(threads)
        warm_up(bench.step, VARIANTS, 1)
        wall = _rounds(bench, wall_reps, time.perf_counter, log, f"wall, {threads} threads")
        params = bench.params
        shape = tuple(bench.batch["y"].shape)
    restoring = measure_restore(threads=threads)
    log(f"restore: RTF {restoring['rtf_wall']:.3f} wall on {threads} threads, {restoring['rtf_cpu_1thread']:.3f} "
        "CPU on 1 thread")
    ratios, ratios_of_medians = _ratios(cpu)
    wall_ratios, wall_ratios_of_medians = _ratios(wall)
    targets = {"dpo / (supervised + ref_forward)": 1.05, "dpo_cached_ref / supervised": 1.05}
    notes = (f"FlowEnhancer {list(MODEL['channels'])} channels ({params / 1e6:.2f} M parameters), LoRA r={LORA_R} on "
             f"its residual blocks, {PAIRS} pairs of {CROP_SECONDS:g} s crops per step (policy batch {shape})")
    return {
        "notes": notes, "parameters": params, "threads": threads, "rounds": reps, "wall_rounds": wall_reps,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cpu_s_per_step": medians(cpu), "all_cpu_s": cpu,
        "wall_s_per_step": medians(wall), "all_wall_s": wall,
        "ratios": ratios, "ratios_of_medians": ratios_of_medians,
        "wall_ratios": wall_ratios, "wall_ratios_of_medians": wall_ratios_of_medians,
        "targets": targets, "pass": {k: ratios[k] <= targets[k] for k in ratios}, "restore": restoring,
    }


def markdown(result: dict[str, Any]) -> str:
    cpu, wall, r, load = (result["cpu_s_per_step"], result["wall_s_per_step"], result["restore"],
                          result["load_average_1min"])
    th = result["threads"]
    lines = [f"{result['notes']}; CPU. Judged on CPU time of one thread ({result['rounds']} rounds of one step per "
             f"variant, interleaved); wall time on {th} threads reported ({result['wall_rounds']} rounds). "
             f"1-minute load average {load['before']:.1f} before, {load['after']:.1f} after (a shared machine: "
             "wall times there are noisy).",
             "", f"| variant | median CPU s/step (1 thread) | median wall s/step ({th} threads) |", "|---|---|---|"]
    lines += [f"| {v} | {cpu[v]:.4f} | {wall[v]:.4f} |" for v in VARIANTS]
    lines += ["", f"| ratio | CPU, 1 thread: median of per-round ratios | ratio of medians | wall, {th} threads: "
              "median of per-round ratios | target | |", "|---|---|---|---|---|---|"]
    for k, v in result["ratios"].items():
        lines.append(f"| {k} | {v:.3f} | {result['ratios_of_medians'][k]:.3f} | {result['wall_ratios'][k]:.3f} | "
                     f"≤ {result['targets'][k]:.2f} | {'PASS' if result['pass'][k] else 'FAIL'} |")
    lines += ["", f"Restoration of a {r['seconds_of_audio']:g} s input ({r['steps']} {r['method']} steps, "
              f"{r['chunk_seconds']:g} s chunks with {r['overlap_seconds']:g} s overlap): real-time factor "
              f"**{r['rtf_wall']:.3f}** wall on {th} threads (median {statistics.median(r['wall_s']):.2f} s), "
              f"{r['rtf_cpu_1thread']:.3f} in CPU time on one thread (the work; {th} free cores would take about "
              f"half of it). Real-time factor = time / audio duration; < 1 is faster than real time."]
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """For ``benchmarks/run.py``: the CPU benchmark on 2 threads."""
    result = measure(reps=3 if quick else 15, wall_reps=2 if quick else 7, warmup=1 if quick else 2)
    result["markdown"] = markdown(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15, help="rounds (one step of each variant per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--wall-reps", type=int, default=7, help="rounds timed by the wall clock on --threads threads")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    p.add_argument("--out", help="write speech_flow_step.{json,md} here")
    args = p.parse_args(argv)
    result = measure(reps=args.reps, wall_reps=args.wall_reps, warmup=args.warmup, threads=args.threads)
    result["command"] = "python benchmarks/speech_flow_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    md = (f"# speech_flow_step\n\n`{result['command']}` — {result['date']}, torch {torch.__version__}\n\n"
          + markdown(result) + "\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speech_flow_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "speech_flow_step.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
