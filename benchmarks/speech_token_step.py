"""Cost of a speech-token DPO step against its floor, and restoration speed, for the masked and the AR restorer.

The floor of a DPO step (Rafailov et al. 2023) is a supervised LoRA step on the same 2B responses (chosen and
rejected) plus ONE no-grad forward (the reference pass: LoRA disabled, no second model). Per paradigm, four
variants run on the same collated batch, the same LoRA and the same optimizer, through the adapter's own
``scores`` + ``compute_loss`` exactly as the trainer calls them:

- ``supervised``: policy forward on the 2B rows, NLL ``−Σ logπ / Σ n_tokens`` (the masked model: MaskGIT's loss
  on the pair's shared mask; the AR model: teacher-forced next-frame loss), backward, AdamW step;
- ``ref_forward``: the reference pass alone (``no_grad``, ``lora_disabled``);
- ``dpo``: reference pass + policy pass + the sigmoid DPO loss, backward, step;
- ``dpo_cached_ref``: DPO with the reference log-probs given (cached), no reference pass.

Fairness: ``collate`` (loading the crops and encoding chosen, rejected and degraded with the frozen codec) is
what a supervised step on the same data would do too, so it is done once, outside every timed step, and
reported on its own (``collate``). Times: per-step medians over repetitions interleaved in one process (after
warm-up), in rounds of one step per variant in a rotating order, so drift and bursts of load on this shared
machine hit every variant alike. The verdict is the median over rounds of each round's own ratio (paired, see
``measure_steps``); the ratios of medians and of the fastest steps are reported beside it.

Restoration: the real-time factor (wall time / audio duration) of :func:`mm_align.audio.token_models.restore` on
a 10 s input, in 8 s chunks with 1 s overlap (the defaults), with 2 torch threads (the target: 2 cores) and with
1: the masked model with 8 MaskGIT steps, the AR model sampling at temperature 1 (key/value-cached, one frame at
a time). The step timings run on 1 thread by default: on cores shared with other jobs, OpenMP spin-waits of a
second thread make step times swing far more than the differences the ratios look for.

    python benchmarks/speech_token_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timing import (
    fastest,
    format_times,
    median_of_ratios,
    medians,
    per_round_ratios,
    rotating,
    time_rounds,
    warm_up,
)

VARIANTS = ("supervised", "ref_forward", "dpo", "dpo_cached_ref")
PARADIGMS = ("masked", "ar")


@dataclass
class Size:
    """Codec, restorer and batch sizes."""

    codec: dict[str, Any] = field(default_factory=dict)  # CodecConfig overrides (default: 16 kHz, hop 256, Q 4, K 256)
    restorer: dict[str, Any] = field(default_factory=lambda: dict(dim=256, depth=4, heads=4, attn_window=32))
    pairs: int = 4
    crop_seconds: float = 2.0
    lora_r: int = 8
    notes: str = ""


SIZES = {
    "small": Size(notes="codec 16 kHz / hop 256 (62.5 frames/s), Q = 4 codebooks of K = 256; restorers of width 256, "
                        "4 layers, 4 heads, attention window 32 frames (≈ 3.5 M parameters); 4 pairs of 2 s crops "
                        "(126 frames × 4 codebooks per response); LoRA r = 8 on to_q/to_k/to_v/to_out"),
    "tiny": Size(codec=dict(hidden=32, latent_dim=16, num_quantizers=2, codebook_size=16),
                 restorer=dict(dim=32, depth=2, heads=2, attn_window=8), pairs=2, crop_seconds=0.5, lora_r=2,
                 notes="a smoke-test size (not a measurement)"),
}


def _wave(seed: int, seconds: float, sr: int = 16000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(sr * seconds)) / sr
    freqs = 120 + 400 * torch.rand(4, generator=g)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + 3 * torch.rand(1, generator=g)) * t)
    return 0.15 * env * sum(torch.sin(2 * math.pi * f * t) for f in freqs)


def _world(size: Size, root: Path) -> Path:
    """A random codec, both restorers (saved with save_restorer) and a speech_pairs manifest of 2 × pairs records."""
    from mm_align.audio.codec import CodecConfig, SpeechCodec
    from mm_align.audio.io import save_audio
    from mm_align.audio.token_models import (
        ARRestorerConfig,
        ARTokenRestorer,
        MaskedRestorerConfig,
        MaskedTokenRestorer,
        save_restorer,
    )

    torch.manual_seed(0)
    codec = SpeechCodec(CodecConfig(**size.codec)).eval()
    c = codec.config
    shape = dict(num_quantizers=c.num_quantizers, codebook_size=c.codebook_size, cond_dim=c.latent_dim,
                 **size.restorer)
    save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**shape)), codec, root / "masked")
    save_restorer(ARTokenRestorer(ARRestorerConfig(**shape)), codec, root / "ar")
    rows = []
    for i in range(2 * size.pairs):
        clean = _wave(i, size.crop_seconds + 0.5, c.sample_rate)
        for name, level in (("deg", 0.1), ("good", 0.01), ("bad", 0.08)):
            noisy = clean + level * torch.randn(clean.shape, generator=torch.Generator().manual_seed(100 * i + 7))
            save_audio(root / "data" / name / f"u{i}.wav", noisy, c.sample_rate)
        rows.append({"id": f"u{i}", "degraded": f"deg/u{i}.wav", "chosen": f"good/u{i}.wav",
                     "rejected": f"bad/u{i}.wav"})
    (root / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


class Bench:
    """One paradigm: the adapter, the LoRA'd restorer, one optimizer and one fixed collated batch."""

    def __init__(self, paradigm: str, size: Size, root: Path) -> None:
        from mm_align.audio.speech_records import read_speech_pairs
        from mm_align.audio.token_adapters import ARSpeechAdapter, MaskedTokenSpeechAdapter

        from mm_align.lora import LoraSettings, add_lora

        cls = MaskedTokenSpeechAdapter if paradigm == "masked" else ARSpeechAdapter
        self.adapter = cls.from_config({"pretrained": str(root / paradigm), "crop_seconds": size.crop_seconds})
        self.adapter.base_dir = root / "data"
        self.params = sum(p.numel() for p in self.adapter.model.parameters())
        torch.manual_seed(0)
        self.model = add_lora(self.adapter.model, LoraSettings(r=size.lora_r), self.adapter.lora_target_modules)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-5)
        self.records = list(read_speech_pairs(root / "data" / "pairs.jsonl").records)[: size.pairs]
        self.seeds = list(range(size.pairs))
        self.batch = self.collate()
        self.frames = int(self.batch["codes"].shape[-1])
        with torch.no_grad():
            self.cached_ref = self._reference()

    def collate(self) -> dict[str, torch.Tensor]:
        return self.adapter.collate(self.records, self.seeds)

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
        s = self.adapter.scores(self.batch, self.model)
        logp = torch.cat([s.chosen, s.rejected])
        n = torch.cat([s.n_tokens_chosen, s.n_tokens_rejected])
        self._update(-logp.sum() / n.sum())

    def ref_forward(self) -> None:
        self._reference().chosen.sum().item()

    def dpo(self) -> None:
        from mm_align.losses import compute_loss

        reference = self._reference()  # first, as the trainer does: its activations are gone before the policy's
        self._update(compute_loss(["sigmoid"], None, self.adapter.scores(self.batch, self.model), reference).loss)

    def dpo_cached_ref(self) -> None:
        from mm_align.losses import compute_loss

        policy = self.adapter.scores(self.batch, self.model)
        self._update(compute_loss(["sigmoid"], None, policy, self.cached_ref).loss)

    def step(self, variant: str) -> None:
        getattr(self, variant)()


def _median_time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_steps(paradigm: str, size: Size, root: Path, reps: int, steps_per_rep: int, warmup: int,
                  log=print) -> dict[str, Any]:
    bench = Bench(paradigm, size, root)
    warm_up(bench.step, VARIANTS, warmup)

    def progress(r: int, times: dict[str, list[float]]) -> None:
        if (r + 1) % steps_per_rep == 0:
            log(f"{paradigm} rep {(r + 1) // steps_per_rep}/{reps}: {format_times(medians(times))}")

    # one step per variant per round, in a rotating (and alternately reversed) order: a burst of load from other
    # jobs lands on every variant alike, and no variant always follows the same one; steps_per_rep rounds a rep
    times = time_rounds(bench.step, VARIANTS, reps * steps_per_rep, order=rotating, after_round=progress)
    collate = _median_time(bench.collate, max(3, reps))
    med = medians(times)
    fast = fastest(times)

    def judged(t: dict[str, float]) -> dict[str, float]:
        return {"dpo / (supervised + ref_forward)": t["dpo"] / (t["supervised"] + t["ref_forward"]),
                "dpo_cached_ref / supervised": t["dpo_cached_ref"] / t["supervised"]}

    # the verdict: per round (every variant once, adjacent in time), the ratio of that round's steps; then the
    # median over rounds. Load from other jobs arrives in bursts that lengthen steps (a right-skewed delay), and
    # the median of a sum exceeds the sum of medians under such noise, so the ratio of medians is biased against
    # the DPO step (one interval compared with two shorter ones); paired per-round ratios compare intervals of
    # the same total length taken at the same time.
    rounds = per_round_ratios(times, judged)
    ratios = median_of_ratios(rounds)
    targets = {k: 1.05 for k in ratios}
    return {"parameters": bench.params, "frames_per_response": bench.frames, "median_s_per_step": med,
            "fastest_s_per_step": fast, "ratios": ratios, "ratios_of_medians": judged(med),
            "ratios_of_fastest": judged(fast), "per_round_ratios": rounds, "all_s_per_step": times,
            "collate_median_s": statistics.median(collate), "targets": targets,
            "pass": {k: ratios[k] <= targets[k] for k in ratios}}


def measure_restore(paradigm: str, root: Path, threads: int, seconds: float = 10.0,
                    repeats: int = 2) -> dict[str, Any]:
    from mm_align.audio.token_models import load_restorer, restore

    torch.set_num_threads(threads)
    model, codec = load_restorer(root / paradigm)
    wave = _wave(99, seconds, codec.sample_rate) + 0.05 * torch.randn(int(seconds * codec.sample_rate),
                                                                       generator=torch.Generator().manual_seed(9))
    restore(model, codec, wave[: codec.sample_rate], codec.sample_rate, steps=8)  # warm-up
    walls = []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = restore(model, codec, wave, codec.sample_rate, steps=8, seed=r, chunk_seconds=8.0, overlap_seconds=1.0)
        walls.append(time.perf_counter() - t0)
        assert out.shape == wave.shape and torch.isfinite(out).all()
    wall = statistics.median(walls)
    return {"threads": threads, "input_seconds": seconds, "wall_s": wall, "all_wall_s": walls, "rtf": wall / seconds,
            "settings": "masked: 8 MaskGIT steps, sampled" if paradigm == "masked" else "AR: sampled, temperature 1"}


def measure(size_name: str = "small", reps: int = 7, steps_per_rep: int = 3, warmup: int = 2, step_threads: int = 1,
            restore_threads: tuple[int, ...] = (2, 1), log=print) -> dict[str, Any]:
    size = SIZES[size_name]
    out: dict[str, Any] = {"size": size_name, "notes": size.notes, "size_config": asdict(size),
                           "step_threads": step_threads, "restore_threads": list(restore_threads),
                           "load_average_before": os.getloadavg(),
                           "reps": reps, "steps_per_rep": steps_per_rep,
                           "samples_per_variant": reps * steps_per_rep, "paradigms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = _world(size, Path(tmp))
        for p in PARADIGMS:
            torch.set_num_threads(step_threads)
            out["paradigms"][p] = measure_steps(p, size, root, reps, steps_per_rep, warmup, log)
            out["paradigms"][p]["restore"] = [measure_restore(p, root, t) for t in restore_threads]
            log(f"{p}: restore RTF " + ", ".join(f"{r['rtf']:.3f} ({r['threads']} threads)"
                                                 for r in out["paradigms"][p]["restore"]))
    out["load_average_after"] = os.getloadavg()
    out["pass"] = all(v for p in out["paradigms"].values() for v in p["pass"].values())
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['notes']}. CPU; steps on {result['step_threads']} torch thread(s). Step times: medians (and "
             f"minima) of {result['samples_per_variant']} steps per variant, taken in rounds of one step per variant "
             "in a rotating order, on one collated batch; collate (crops + frozen-codec encoding of chosen, "
             "rejected and degraded) is the same for every variant, done once outside the timed steps and shown "
             "on its own. Machine load (1-min load average, 2 cores) before / after: "
             f"{result['load_average_before'][0]:.1f} / {result['load_average_after'][0]:.1f} — other jobs shared "
             "the cores, so absolute times are pessimistic; the ratios compare variants interleaved under the same "
             "load. The verdict is the median over rounds of each round's ratio (the variants of a round ran "
             "back to back): bursts of load lengthen steps with a right-skewed delay, under which the median of one "
             "long step exceeds the sum of the medians of two short ones, so the ratio of medians is biased against "
             "the DPO step; the ratio of medians and of the fastest steps are shown beside it.", ""]
    for p, r in result["paradigms"].items():
        med = r["median_s_per_step"]
        lines += [f"## {p} ({r['parameters'] / 1e6:.2f} M parameters, {r['frames_per_response']} frames per "
                  "response)", "", "| variant | median s/step |", "|---|---|"]
        fast = r["fastest_s_per_step"]
        lines[-2:] = ["| variant | median s/step | fastest s/step |", "|---|---|---|"]
        lines += [f"| {v} | {med[v]:.4f} | {fast[v]:.4f} |" for v in VARIANTS]
        lines += [f"| (collate, not in the steps) | {r['collate_median_s']:.4f} | |", "",
                  "| ratio | median of per-round ratios | target | | ratio of medians | ratio of fastest |",
                  "|---|---|---|---|---|---|"]
        for k, v in r["ratios"].items():
            lines.append(f"| {k} | {v:.3f} | ≤ {r['targets'][k]:.2f} | {'PASS' if r['pass'][k] else 'FAIL'} | "
                         f"{r['ratios_of_medians'][k]:.3f} | {r['ratios_of_fastest'][k]:.3f} |")
        lines += [""]
        for rs in r["restore"]:
            lines.append(f"restore, {rs['input_seconds']:.0f} s input in 8 s chunks with 1 s overlap "
                         f"({rs['settings']}), {rs['threads']} threads: {rs['wall_s']:.2f} s wall, real-time factor "
                         f"**{rs['rtf']:.3f}**  ")
        lines += ["", "(The restore timings ran on the same shared cores: with other jobs runnable, a second OpenMP "
                  "thread spends its time waiting on the first — the AR model's work per frame is a few "
                  "matrix-vector products — so here 2 threads are slower than 1.)", ""]
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """For ``benchmarks/run.py``-style runners."""
    result = measure(reps=2 if quick else 7, steps_per_rep=2 if quick else 3, warmup=1 if quick else 2)
    result["markdown"] = markdown(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps-per-rep", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--step-threads", type=int, default=1,
                   help="torch threads for the step timings (1: no OpenMP spin-waits on shared cores)")
    p.add_argument("--restore-threads", type=int, nargs="+", default=[2, 1],
                   help="torch threads for the restore timings (the target: 2 cores)")
    p.add_argument("--out", help="write speech_token_step.{json,md} here")
    args = p.parse_args(argv)
    started = time.time()
    result = measure(args.size, args.reps, args.steps_per_rep, args.warmup, args.step_threads,
                     tuple(args.restore_threads))
    args_line = " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = f"python benchmarks/speech_token_step.py {args_line}".strip()
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime(started))
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": "cpu"}
    md = (f"# speech_token_step ({args.size})\n\n`{result['command']}` — {result['date']}, "
          f"{result['machine']['processor']}, torch {torch.__version__}, {os.cpu_count()} cores, cpu\n\n"
          + markdown(result) + "\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speech_token_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "speech_token_step.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
