"""Every loss against hand-computed values, its sanity value, a gradient step, extreme inputs, and the
registry's errors.

Expected numbers are worked out in each docstring or comment with the Python ``math`` module, never by
calling the implementation: σ(x) = 1/(1 + e^−x), −logσ(x) = log(1 + e^−x), f(z) = z/expm1(z).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mm_align.losses import (
    LOSSES,
    LossSpec,
    compute_loss,
    diffusion_dpo,
    get_loss,
    ipo,
    kto,
    loss_param_names,
    mapo,
    minmax_normalise,
    sigmoid,
    smpo,
)
from mm_align.types import LossOutput, Scores

LN2 = math.log(2.0)
TOL = 1e-5
ALL_LOSSES = sorted(LOSSES)
ERROR_LOSSES = [n for n in ALL_LOSSES if LOSSES[n].score_kind == "error"]
LOGP_LOSSES = [n for n in ALL_LOSSES if LOSSES[n].score_kind == "logp"]


def approx(x: float) -> object:
    return pytest.approx(x, rel=TOL, abs=TOL)


def neg_logsig(x: float) -> float:
    """−logσ(x) = log(1 + e^−x), the reference arithmetic of the docstrings."""
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t64(v: list[float]) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def err(pw: list[float], pl: list[float], **extra: list[float]) -> Scores:
    return Scores("error", t64(pw), t64(pl), extra={k: t64(v) for k, v in extra.items()})


def logp(pw: list[float], pl: list[float], n: tuple[list[float], list[float]] | None = None) -> Scores:
    n_w, n_l = (None, None) if n is None else (t64(n[0]), t64(n[1]))
    return Scores("logp", t64(pw), t64(pl), n_tokens_chosen=n_w, n_tokens_rejected=n_l)


def unpaired(kind: str, values: list[float], desirable: list[bool], n: list[float] | None = None) -> Scores:
    return Scores(
        kind,  # type: ignore[arg-type]
        t64(values),
        desirable=torch.tensor(desirable),
        n_tokens_chosen=None if n is None else t64(n),
    )


def run(name: str, policy: Scores, reference: Scores | None = None, beta: float | None = None, **params) -> float:
    return compute_loss([name], None, policy, reference, beta, params).loss.item()


# ============================================================ 1. hand-computed values


def test_diffusion_dpo_values():
    """A: errθ_w=0.30, errref_w=0.25, errθ_l=0.20, errref_l=0.22, β=100: d = 0.05 − (−0.02) = 0.07;
    loss = −logσ(−50·0.07) = −logσ(−3.5) = log(1 + e^3.5) = 3.5297504.
    B: errθ_w=0.10, errref_w=0.12, errθ_l=0.40, errref_l=0.35, β=50: d = −0.02 − 0.05 = −0.07;
    loss = −logσ(25·0.07) = −logσ(1.75) = 0.1602242.
    Batch {A, B} at β=50: A gives −logσ(−1.75) = 1.9102242, so the mean OUTSIDE logσ is
    (1.9102242 + 0.1602242)/2 = 1.0352242, whereas the mean inside (d̄ = 0) would give ln 2."""
    assert run("diffusion_dpo", err([0.30], [0.20]), err([0.25], [0.22]), beta=100) == approx(3.5297504)
    assert run("diffusion_dpo", err([0.10], [0.40]), err([0.12], [0.35]), beta=50) == approx(0.1602242)
    both = run("diffusion_dpo", err([0.30, 0.10], [0.20, 0.40]), err([0.25, 0.12], [0.22, 0.35]), beta=50)
    assert both == approx(1.0352242)
    assert both == approx((neg_logsig(-25 * 0.07) + neg_logsig(25 * 0.07)) / 2)
    assert abs(both - LN2) > 0.3  # not the mean-inside-logσ defect


def test_npo_values():
    """NPO swaps chosen and rejected: d' = (errθ_l − errref_l) − (errθ_w − errref_w).
    A (β=100): d' = −0.02 − 0.05 = −0.07; loss = −logσ(50·0.07) = −logσ(3.5) = 0.0297504.
    A (β=50): −logσ(1.75) = 0.1602242. B (β=50): d' = 0.05 − (−0.02) = 0.07; −logσ(−1.75) = 1.9102242."""
    assert run("npo", err([0.30], [0.20]), err([0.25], [0.22]), beta=100) == approx(0.0297504)
    assert run("npo", err([0.30], [0.20]), err([0.25], [0.22]), beta=50) == approx(0.1602242)
    assert run("npo", err([0.10], [0.40]), err([0.12], [0.35]), beta=50) == approx(1.9102242)


def test_smpo_values():
    """Pair A errors (d = 0.07), β = 100.
    Rewards (0.9, 0.2): p_w = e^0.9/(e^0.9 + e^0.2) = σ(0.7) = 0.6681878; β_i = 100·10·(2p_w − 1) = 336.37554;
    loss = −logσ(−336.37554/2·0.07) = −logσ(−11.773144) = 11.7731518.
    Rewards (0.3, 0.6): p_w = σ(−0.3) = 0.4255575; β_i = −148.88503; loss = −logσ(5.2109762) = 0.0054415."""
    ref = err([0.25], [0.22])
    assert run("smpo", err([0.30], [0.20], reward_chosen=[0.9], reward_rejected=[0.2]), ref, beta=100) == approx(
        11.7731518
    )
    assert run("smpo", err([0.30], [0.20], reward_chosen=[0.3], reward_rejected=[0.6]), ref, beta=100) == approx(
        0.0054415
    )


def test_mapo_values():
    """f(z) = z/(eᶻ − 1), s = 0.5, T = 1000.
    A: errθ_w = 0.30, errθ_l = 0.3002, β_m = 0.1: m = f(0.15) − f(0.1501) = 4.7501042e-5; T·m = 0.0475010;
    loss = 0.30 + 0.1·(−logσ(0.0475010)) = 0.30 + 0.1·0.6696787 = 0.3669679.
    B: errθ_w = 0.5, errθ_l = 0.45, β_m = 0.1: m = f(0.25) − f(0.225) = −0.0115123;
    loss = 0.5 + 0.1·(−logσ(−11.512279)) = 0.5 + 0.1·11.512289 = 1.6512289.
    C: errθ_w = 1, errθ_l = 2, β_m = 0.5: m = f(0.5) − f(1) = 0.7707470 − 0.5819767 = 0.1887703;
    −logσ(188.77) ≈ 1e-82, loss = 1.0."""
    assert run("mapo", err([0.30], [0.3002])) == approx(0.3669679)
    assert run("mapo", err([0.5], [0.45])) == approx(1.6512289)
    assert run("mapo", err([1.0], [2.0]), beta=0.5) == approx(1.0)
    assert run("mapo", err([0.5], [0.45]), s=1.0, num_train_timesteps=10) == approx(
        # s = 1, T = 10: m = f(0.5) − f(0.45) = −0.0224474 ; 0.5 + 0.1·(−logσ(−0.224474))
        0.5 + 0.1 * neg_logsig(10 * (0.5 / math.expm1(0.5) - 0.45 / math.expm1(0.45)))
    )


def test_diffusion_kto_values():
    """A: errθ = [0.2, 0.3], errref = [0.25, 0.28], desirable = [T, F], β = 10:
    r = errref − errθ = [0.05, −0.02]; z_ref = max(0, 0.015) = 0.015; z = [0.035, −0.035];
    desirable 1 − σ(0.35) = 0.4133824; undesirable 1 − σ(−10·(−0.035)) = 0.4133824; mean 0.4133824.
    With λ_D = 2: (2·0.4133824 + 0.4133824)/2 = 0.6200736.
    B: errθ = [0.5, 0.1], errref = [0.4, 0.3], β = 20, λ_U = 0.5: r = [−0.1, 0.2], z_ref = 0.05,
    z = [−0.15, 0.15]; (1 − σ(−3) + 0.5·(1 − σ(−3)))/2 = 0.7144306."""
    p, r = unpaired("error", [0.2, 0.3], [True, False]), unpaired("error", [0.25, 0.28], [True, False])
    assert run("diffusion_kto", p, r, beta=10) == approx(0.4133824)
    assert run("diffusion_kto", p, r, beta=10, lambda_d=2.0) == approx(0.6200736)
    p, r = unpaired("error", [0.5, 0.1], [True, False]), unpaired("error", [0.4, 0.3], [True, False])
    assert run("diffusion_kto", p, r, beta=20, lambda_u=0.5) == approx(0.7144306)


def test_diffusion_kto_mismatched_kl_estimate_has_the_reward_sign():
    """Point A with extra["kl"]: policy errors 0.2, reference errors 0.3 on mismatched pairs:
    z_ref = max(0, mean(ref_kl − policy_kl)) = 0.1 (same sign as r = errref − errθ); z = [−0.05, −0.12];
    (1 − σ(−0.5) + 1 − σ(1.2))/2 = 0.4269673. The opposite sign would clamp to 0 and give 0.4133824."""
    p, r = unpaired("error", [0.2, 0.3], [True, False]), unpaired("error", [0.25, 0.28], [True, False])
    p.extra, r.extra = {"kl": t64([0.2, 0.2])}, {"kl": t64([0.3, 0.3])}
    out = compute_loss(["diffusion_kto"], None, p, r, 10.0)
    assert out.loss.item() == approx(0.4269673)
    assert out.metrics["kl"].item() == approx(0.1)


# Sequence points. A: logπθ = (−10, −12), logπref = (−11, −11.5), n = (4, 5), β = 0.5: r⁺ = 1, r⁻ = −0.5,
# Δ = 1.5, βΔ = 0.75.  B: logπθ = (−20, −15), logπref = (−18, −16), n = (4, 5), β = 0.1: r⁺ = −2, r⁻ = 1,
# Δ = −3, βΔ = −0.3.
POINT_A = (logp([-10.0], [-12.0], n=([4.0], [5.0])), logp([-11.0], [-11.5]), 0.5)
POINT_B = (logp([-20.0], [-15.0], n=([4.0], [5.0])), logp([-18.0], [-16.0]), 0.1)


@pytest.mark.parametrize(
    "name, params, expected_a, expected_b",
    [
        # −logσ(0.75) = 0.3868710 ; −logσ(−0.3) = 0.8543552
        ("sigmoid", {}, 0.3868710, 0.8543552),
        # max(0, 1 − 0.75) = 0.25 ; max(0, 1 + 0.3) = 1.3
        ("hinge", {}, 0.25, 1.3),
        # ε = 0.2: [0.8·0.3868710 + 0.2·logσ(−0.75)]/0.6 = [0.3094968 − 0.2·1.1368710]/0.6 = 0.1368710 ;
        # [0.8·0.8543552 − 0.2·0.5543552]/0.6 = 0.9543552
        ("robust", {"label_smoothing": 0.2}, 0.1368710, 0.9543552),
        # ε = 0: plain DPO
        ("robust", {}, 0.3868710, 0.8543552),
        # −logσ(0.5) − logσ(0.25) = 0.4740770 + 0.5759394 = 1.0500164 ;
        # −logσ(−0.2) − logσ(−0.1) = 0.7981389 + 0.7443967 = 1.5425355
        ("bco_pair", {}, 1.0500164, 1.5425355),
        # 1/(2β) = 1: (1 − 1)² + (−0.5 + 1)² = 0.25 ; 1/(2β) = 5: (−2 − 5)² + (1 + 5)² = 49 + 36 = 85
        ("sppo_hard", {}, 0.25, 85.0),
        # token-averaged: Δ̄ = 1/4 + 0.5/5 = 0.35, (0.35 − 1)² = 0.4225 ; Δ̄ = −2/4 − 1/5 = −0.7, (−0.7 − 5)² = 32.49
        ("ipo", {}, 0.4225, 32.49),
    ],
)
def test_sequence_loss_values(name, params, expected_a, expected_b):
    for (policy, reference, beta), expected in ((POINT_A, expected_a), (POINT_B, expected_b)):
        assert run(name, policy, reference, beta=beta, **params) == approx(expected)


def test_sequence_losses_average_outside_the_nonlinearity():
    """Batch {A, B} at β = 0.5: βΔ = (0.75, −1.5); sigmoid = (0.3868710 + 1.7014132)/2 = 1.0441421, not
    −logσ(mean βΔ) = −logσ(−0.375) = 0.9075; hinge = (0.25 + 2.5)/2 = 1.375."""
    policy = logp([-10.0, -20.0], [-12.0, -15.0])
    reference = logp([-11.0, -18.0], [-11.5, -16.0])
    assert run("sigmoid", policy, reference, beta=0.5) == approx((neg_logsig(0.75) + neg_logsig(-1.5)) / 2)
    assert run("sigmoid", policy, reference, beta=0.5) == approx(1.0441421)
    assert run("hinge", policy, reference, beta=0.5) == approx(1.375)


def test_kto_values():
    """logπref = [−6, −6], desirable = [T, F], β = 0.5.
    logπθ = [−5, −7]: r = [1, −1], z_ref = max(0, 0) = 0; desirable 1 − σ(0.5), undesirable 1 − σ(0.5):
    0.3775407.  logπθ = [−4, −5]: r = [2, 1], z_ref = 1.5, z = [0.5, −0.5]: 1 − σ(0.25) twice: 0.4378235.
    logπθ = [−8, −7]: r = [−2, −1], mean −1.5 clamped to z_ref = 0: (1 − σ(−1) + 1 − σ(0.5))/2 = 0.5542996."""
    ref = unpaired("logp", [-6.0, -6.0], [True, False])
    assert run("kto", unpaired("logp", [-5.0, -7.0], [True, False]), ref, beta=0.5) == approx(0.3775407)
    assert run("kto", unpaired("logp", [-4.0, -5.0], [True, False]), ref, beta=0.5) == approx(0.4378235)
    assert run("kto", unpaired("logp", [-8.0, -7.0], [True, False]), ref, beta=0.5) == approx(0.5542996)


def test_kto_mismatched_kl_estimate():
    """logπθ = [−5, −7], logπref = [−6, −6], β = 0.5, extra kl: policy −3, reference −4 → z_ref = 1;
    z = [0, −2]: (1 − σ(0) + 1 − σ(1))/2 = (0.5 + 0.2689414)/2 = 0.3844707."""
    p, r = unpaired("logp", [-5.0, -7.0], [True, False]), unpaired("logp", [-6.0, -6.0], [True, False])
    p.extra, r.extra = {"kl": t64([-3.0, -3.0])}, {"kl": t64([-4.0, -4.0])}
    assert run("kto", p, r, beta=0.5) == approx(0.3844707)


def test_sft_values():
    """logp: −logπθ(w)/n(w) = 10/4 = 2.5 (A) and 20/4 = 5 (B); errors: errθ(w) = 0.3; unpaired: only the
    desirable samples: −(−6/3 + −4/2)/2 = 2.0 (the undesirable −100/1 is ignored)."""
    assert run("sft", POINT_A[0]) == approx(2.5)
    assert run("sft", POINT_B[0]) == approx(5.0)
    assert run("sft", err([0.3], [0.2])) == approx(0.3)
    assert run("sft", unpaired("logp", [-6.0, -100.0, -4.0], [True, False, True], n=[3.0, 1.0, 2.0])) == approx(2.0)


# ============================================================ 2. sanity values at policy = reference

BETA_FOR_SANITY = 0.1
PAIRED_SANITY = {
    "diffusion_dpo": LN2,
    "npo": LN2,
    "sigmoid": LN2,
    "robust": LN2,
    "hinge": 1.0,
    "bco_pair": 2 * LN2,
    "ipo": 1 / (4 * BETA_FOR_SANITY**2),  # = 25
    "sppo_hard": 2 * (1 / (2 * BETA_FOR_SANITY)) ** 2,  # = 50
}


@pytest.mark.parametrize(
    "name, label_smoothing", [(n, 0.0) for n in sorted(PAIRED_SANITY)] + [("robust", 0.3), ("robust", 0.49)]
)
def test_policy_equals_reference_gives_the_sanity_value(name, label_smoothing):
    spec = get_loss(name)
    beta = BETA_FOR_SANITY if spec.score_kind == "logp" else spec.default_beta
    if spec.score_kind == "error":
        s = err([0.3, 0.7, 1.2], [0.5, 0.2, 0.9])
    else:
        s = logp([-10.0, -3.0, -40.0], [-12.0, -8.0, -1.0], n=([4.0, 2.0, 9.0], [5.0, 3.0, 1.0]))
    params = {"label_smoothing": label_smoothing} if name == "robust" else {}
    assert run(name, s, s.detach(), beta=beta, **params) == approx(PAIRED_SANITY[name])


def test_smpo_sanity():
    """d = 0 for every pair, so −logσ(0) = ln 2 whatever β_i (here 2p_w − 1 ≠ 0: rewards differ)."""
    s = err([0.3, 0.7], [0.5, 0.2], reward_chosen=[0.9, 0.1], reward_rejected=[0.2, 0.8])
    assert run("smpo", s, s.detach()) == approx(LN2)


@pytest.mark.parametrize("name, kind", [("kto", "logp"), ("diffusion_kto", "error")])
@pytest.mark.parametrize("lam", [1.0, 3.0])
def test_kto_sanity(name, kind, lam):
    """r = 0 and z_ref = 0, so every sample's loss is λ(1 − σ(0)) = λ/2."""
    s = unpaired(kind, [0.3, 0.9, 0.5, 0.1], [True, False, True, False])
    assert run(name, s, s.detach(), lambda_d=lam, lambda_u=lam) == approx(0.5 * lam)


@pytest.mark.parametrize("e", [0.37, math.e])
@pytest.mark.parametrize("beta_m", [0.1, 0.5])
def test_mapo_sanity(e, beta_m):
    """At errθ_w = errθ_l = e: m = 0, loss = e − β_m·logσ(0) = e + β_m·ln 2."""
    assert run("mapo", err([e, e], [e, e]), beta=beta_m) == approx(e + beta_m * LN2)


# ============================================================ 3. one gradient step moves the margin

N_PAIRS = 6


def _start(kind: str, paired: bool) -> tuple[Scores, Scores]:
    """Policy = reference + small noise, where every loss has a definite direction (sppo targets ±1/(2β),
    hinge active, IPO below its target). Reference is detached; policy leaves require grad."""
    g = torch.Generator().manual_seed(0)

    def rand(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.rand(N_PAIRS if paired else 2 * N_PAIRS, generator=g, dtype=torch.float64)

    base_w, base_l = (rand() + 0.1, rand() + 0.1) if kind == "error" else (-5 * rand() - 1, -5 * rand() - 1)
    noise = 1e-3 if kind == "error" else 0.05
    n = torch.full_like(base_w, 3.0)
    if not paired:
        desirable = torch.arange(2 * N_PAIRS) % 2 == 0
        ref = Scores(kind, base_w, desirable=desirable, n_tokens_chosen=n)  # type: ignore[arg-type]
        pol = Scores(
            kind,  # type: ignore[arg-type]
            (base_w + noise * (rand() - 0.5)).requires_grad_(True),
            desirable=desirable,
            n_tokens_chosen=n,
        )
        return pol, ref
    extra = {"reward_chosen": 0.5 + rand(0.5), "reward_rejected": rand(0.5)}  # r_w > r_l: every β_i > 0
    ref = Scores(kind, base_w, base_l, n_tokens_chosen=n, n_tokens_rejected=n)  # type: ignore[arg-type]
    pol = Scores(
        kind,  # type: ignore[arg-type]
        (base_w + noise * (rand() - 0.5)).requires_grad_(True),
        (base_l + noise * (rand() - 0.5)).requires_grad_(True),
        n_tokens_chosen=n,
        n_tokens_rejected=n,
        extra=extra,
    )
    return pol, ref


def _step(s: Scores, lr: float) -> Scores:
    """One SGD step on the scores themselves."""

    def moved(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (t - lr * (t.grad if t.grad is not None else torch.zeros_like(t))).detach()

    out = s.detach()
    out.chosen, out.rejected = moved(s.chosen), moved(s.rejected)
    return out


@pytest.mark.parametrize("name, kind", [(n, LOSSES[n].score_kind) for n in ALL_LOSSES if n != "sft"]
                         + [("sft", "logp"), ("sft", "error")])
def test_one_gradient_step_moves_the_margin_the_right_way(name, kind):
    spec = get_loss(name)
    policy, reference = _start(kind, spec.paired)
    beta = 100.0 if kind == "error" and name != "mapo" else (0.1 if name == "mapo" else 0.5)
    loss = compute_loss([name], None, policy, reference, beta).loss
    loss.backward()
    new = _step(policy, lr=1e-4 if kind == "error" else 1e-2)
    if spec.paired:
        before = (policy.chosen - policy.rejected).detach()  # (B,) policy margin; the reference is fixed
        after = new.chosen - new.rejected
        change = after - before
        if kind == "logp":  # Δ = r⁺ − r⁻ increases
            assert (change > 0).all(), change
        elif name == "npo":  # NPO moves toward the rejected sample: errθ_w − errθ_l increases
            assert (change > 0).all(), change
        else:  # errθ_w − errθ_l decreases (for mapo: errθ_w decreases relative to errθ_l)
            assert (change < 0).all(), change
    else:
        des = policy.desirable
        step = new.chosen - policy.chosen.detach()
        up, down = (des, ~des) if kind == "logp" else (~des, des)  # errors: desirable go down
        assert (step[up] > 0).all() and (step[down] < 0).all(), step
    # and the loss went down
    assert compute_loss([name], None, new, reference, beta).loss.item() < loss.item()


# ============================================================ 4. finite at extreme β and inputs


@pytest.mark.parametrize("name, kind", [(n, LOSSES[n].score_kind) for n in ALL_LOSSES if n != "sft"]
                         + [("sft", "logp"), ("sft", "error")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_huge_beta_and_large_inputs(name, kind, dtype):
    """β = 5000; errors uniform in [0, 10], log-probs in [−2000, 0] (|Δ| up to ~2000)."""
    spec = get_loss(name)
    g = torch.Generator().manual_seed(1)
    scale = 10.0 if kind == "error" else -2000.0
    b = 2 * N_PAIRS

    def draw() -> torch.Tensor:
        return (scale * torch.rand(b, generator=g, dtype=torch.float64)).to(dtype)

    n = torch.full((b,), 7.0)
    extra = {"reward_chosen": torch.rand(b, generator=g), "reward_rejected": torch.rand(b, generator=g)}
    if spec.paired:
        policy = Scores(kind, draw().requires_grad_(), draw().requires_grad_(), n_tokens_chosen=n,
                        n_tokens_rejected=n, extra=extra)
        reference = Scores(kind, draw(), draw(), n_tokens_chosen=n, n_tokens_rejected=n)
    else:
        des = torch.arange(b) % 3 == 0
        policy = Scores(kind, draw().requires_grad_(), desirable=des, n_tokens_chosen=n)
        reference = Scores(kind, draw(), desirable=des, n_tokens_chosen=n)
    out = compute_loss([name], None, policy, reference, 5000.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for t in (policy.chosen, policy.rejected):
        if t is not None and t.grad is not None:  # sft leaves the rejected untouched
            assert torch.isfinite(t.grad).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


def test_mapo_is_stable_for_errors_where_exp_overflows():
    """s·err = 150 and 200 overflow e^z in float32 (> 88.7). f(150) ≈ 150·e^−150 ≈ 1e−63, so m ≈ 0 and the
    loss ≈ 300 + 0.1·ln 2 = 300.0693147; at err = 0 exactly f(0) = 1 (no 0/0)."""
    p = Scores("error", torch.tensor([300.0], requires_grad=True), torch.tensor([400.0], requires_grad=True))
    out = compute_loss(["mapo"], None, p, None)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(300.0693147, rel=1e-6)
    assert torch.isfinite(p.chosen.grad).all() and torch.isfinite(p.rejected.grad).all()
    z = Scores("error", torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True))
    out = compute_loss(["mapo"], None, z, None)
    out.loss.backward()
    assert out.loss.item() == approx(0.1 * LN2)
    # d/derr_w of [err_w − β·logσ(T·(f(s·err_w) − f(s·err_l)))] at 0, with f'(0) = −½:
    # 1 − β·T·(1 − σ(0))·s·f'(0) = 1 + 0.1·1000·0.5·0.5·0.5 = 13.5
    assert z.chosen.grad.item() == approx(1 + 0.1 * 1000 * 0.5 * 0.5 * 0.5)


# ============================================================ 5. MaPO ignores the reference


def test_mapo_ignores_reference_inputs():
    p = err([0.2, 0.5, 0.9], [0.3, 0.45, 0.1])
    g = torch.Generator().manual_seed(3)
    random_ref = Scores("error", torch.rand(3, generator=g) * 50, torch.rand(3, generator=g) * 50)
    a = compute_loss(["mapo"], None, p, None)
    b = compute_loss(["mapo"], None, p, random_ref)
    assert a.loss.item() == b.loss.item()
    assert {k: v.item() for k, v in a.metrics.items()} == {k: v.item() for k, v in b.metrics.items()}
    assert mapo(p, random_ref, beta=0.1).loss.item() == mapo(p, None, beta=0.1).loss.item()
    assert not get_loss("mapo").needs_reference


# ============================================================ 6. registry, params, errors, mixtures

EXPECTED_SPECS = {
    # name: (needs_reference, score_kind, paired, default_beta)
    "diffusion_dpo": (True, "error", True, 5000.0),
    "npo": (True, "error", True, 500.0),
    "smpo": (True, "error", True, 5000.0),
    "mapo": (False, "error", True, 0.1),
    "diffusion_kto": (True, "error", False, 1000.0),
    "sigmoid": (True, "logp", True, 0.1),
    "hinge": (True, "logp", True, 0.1),
    "ipo": (True, "logp", True, 0.1),
    "robust": (True, "logp", True, 0.1),
    "bco_pair": (True, "logp", True, 0.1),
    "sppo_hard": (True, "logp", True, 0.1),
    "kto": (True, "logp", False, 0.1),
}


def test_registry_holds_every_loss_with_its_paper_defaults():
    assert set(LOSSES) == set(EXPECTED_SPECS) | {"sft"}
    for name, (needs_ref, kind, paired, beta) in EXPECTED_SPECS.items():
        spec = get_loss(name)
        assert isinstance(spec, LossSpec) and spec.name == name
        got = (spec.needs_reference, spec.score_kind, spec.paired, spec.default_beta)
        assert got == (needs_ref, kind, paired, beta), name
    sft = get_loss("sft")
    assert (sft.needs_reference, sft.score_kind) == (False, "any")
    for spec in LOSSES.values():  # the common signature: fn(policy, reference, *, beta, **own)
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:3] == ["policy", "reference", "beta"]
        assert params["beta"].kind is inspect.Parameter.KEYWORD_ONLY


def test_unknown_loss_lists_valid_ones_sorted():
    with pytest.raises(ValueError) as info:
        get_loss("dpo")
    msg = str(info.value)
    assert msg.startswith("unknown loss 'dpo'; valid losses: ")
    assert msg.endswith(
        "bco_pair, diffusion_dpo, diffusion_kto, hinge, ipo, kto, mapo, npo, robust, sft, sigmoid, smpo, sppo_hard"
    )
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        compute_loss(["sigmoid", "nope"], None, POINT_A[0], POINT_A[1])


def test_loss_param_names():
    assert loss_param_names("robust") == {"label_smoothing": 0.0}
    assert loss_param_names("mapo") == {"s": 0.5, "num_train_timesteps": 1000}
    assert loss_param_names("kto") == {"lambda_d": 1.0, "lambda_u": 1.0}
    assert loss_param_names("diffusion_kto") == {"lambda_d": 1.0, "lambda_u": 1.0}
    for name in ("sigmoid", "hinge", "ipo", "bco_pair", "sppo_hard", "diffusion_dpo", "npo", "smpo", "sft"):
        assert loss_param_names(name) == {}


def test_unknown_param_names_the_key_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"'label_smothing'.*valid keys: label_smoothing"):
        compute_loss(["robust"], None, POINT_A[0], POINT_A[1], 0.1, {"label_smothing": 0.1})
    with pytest.raises(ValueError, match=r"'lambda_d'.*sigmoid.*valid keys: none"):  # declared by kto, not selected
        compute_loss(["sigmoid"], None, POINT_A[0], POINT_A[1], 0.1, {"lambda_d": 1.0})


def test_params_reach_only_the_losses_that_declare_them():
    """robust(ε=0.2) at A = 0.1368710 and sft at A = 2.5; sft must not receive label_smoothing."""
    policy, reference, beta = POINT_A
    out = compute_loss(["robust", "sft"], [1.0, 2.0], policy, reference, beta, {"label_smoothing": 0.2})
    assert out.loss.item() == approx(0.1368710 + 2 * 2.5)


def test_kind_mismatch_is_clear():
    with pytest.raises(ValueError, match=r"'diffusion_dpo' needs 'error' scores.*got 'logp'"):
        compute_loss(["diffusion_dpo"], None, POINT_A[0], POINT_A[1])
    with pytest.raises(ValueError, match=r"'sigmoid' needs 'logp' scores.*got 'error'"):
        compute_loss(["sigmoid"], None, err([0.1], [0.2]), err([0.1], [0.2]))
    with pytest.raises(ValueError, match=r"policy scores are 'logp' but reference scores are 'error'"):
        compute_loss(["sigmoid"], None, POINT_A[0], err([0.1], [0.2]))


def test_pairing_mismatch_is_clear():
    u = unpaired("logp", [-1.0, -2.0], [True, False])
    with pytest.raises(ValueError, match=r"'kto' needs unpaired scores.*got paired"):
        compute_loss(["kto"], None, POINT_A[0], POINT_A[1])
    with pytest.raises(ValueError, match=r"'sigmoid' needs paired scores.*got unpaired"):
        compute_loss(["sigmoid"], None, u, u)
    ue = unpaired("error", [0.1, 0.2], [True, False])
    with pytest.raises(ValueError, match=r"'diffusion_dpo' needs paired scores"):
        compute_loss(["diffusion_dpo"], None, ue, ue)
    with pytest.raises(ValueError, match=r"'diffusion_kto' needs unpaired scores"):
        compute_loss(["diffusion_kto"], None, err([0.1], [0.2]), err([0.1], [0.2]))
    no_flags = Scores("logp", t64([-1.0, -2.0]))
    with pytest.raises(ValueError, match=r"'kto' needs Scores.desirable"):
        compute_loss(["kto"], None, no_flags, no_flags)


def test_missing_reference_is_clear():
    with pytest.raises(ValueError, match=r"'sigmoid' needs reference scores"):
        compute_loss(["sigmoid"], None, POINT_A[0], None)
    with pytest.raises(ValueError, match=r"'diffusion_dpo' needs reference scores"):
        diffusion_dpo(err([0.1], [0.2]), None, beta=1.0)  # a direct call checks too (no bare assert)


def test_loss_specific_input_errors():
    with pytest.raises(ValueError, match="ipo needs response token counts"):
        compute_loss(["ipo"], None, POINT_A[1], POINT_A[1], 0.1)
    with pytest.raises(ValueError, match="ipo needs response token counts"):
        ipo(POINT_A[1], POINT_A[1], beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing.*must be in"):
        compute_loss(["robust"], None, POINT_A[0], POINT_A[1], 0.1, {"label_smoothing": 0.5})
    with pytest.raises(ValueError, match="sft on log-probs needs response token counts"):
        compute_loss(["sft"], None, POINT_A[1], None)
    with pytest.raises(ValueError, match="smpo needs per-pair reward scores.*reward_chosen"):
        smpo(err([0.1], [0.2]), err([0.1], [0.2]), beta=1.0)
    with pytest.raises(ValueError, match="missing reward_rejected"):
        smpo(err([0.1], [0.2], reward_chosen=[0.5]), err([0.1], [0.2]), beta=1.0)


def test_mixture_argument_errors():
    policy, reference, beta = POINT_A
    with pytest.raises(ValueError, match="2 loss weights for 1 losses"):
        compute_loss(["sigmoid"], [1.0, 2.0], policy, reference, beta)
    with pytest.raises(ValueError, match="no loss selected; valid losses: bco_pair"):
        compute_loss([], None, policy, reference, beta)
    with pytest.raises(ValueError, match="unique"):
        compute_loss(["sigmoid", "sigmoid"], None, policy, reference, beta)


def test_mixture_is_the_weighted_sum_of_the_separate_losses():
    """sigmoid + 0.5·sft at A: 0.3868710 + 0.5·2.5 = 1.6368710."""
    policy, reference, beta = POINT_A
    alone_sigmoid = compute_loss(["sigmoid"], None, policy, reference, beta)
    alone_sft = compute_loss(["sft"], None, policy, None, beta)
    mixed = compute_loss(["sigmoid", "sft"], [1.0, 0.5], policy, reference, beta)
    assert mixed.loss.item() == approx(alone_sigmoid.loss.item() + 0.5 * alone_sft.loss.item())
    assert mixed.loss.item() == approx(1.6368710)
    assert mixed.metrics["loss/sigmoid"].item() == approx(0.3868710)
    assert mixed.metrics["loss/sft"].item() == approx(2.5)  # unweighted component value
    for k, v in alone_sigmoid.metrics.items():  # the first loss wins on a key clash (logps/chosen)
        assert mixed.metrics[k].item() == v.item()


def test_beta_none_uses_each_loss_default():
    """diffusion_dpo at pair A with β = 5000: −logσ(−2500·0.07) = −logσ(−175) = 175.0;
    sigmoid at point A with β = 0.1: −logσ(0.1·1.5) = log(1 + e^−0.15) = 0.6209570."""
    assert run("diffusion_dpo", err([0.30], [0.20]), err([0.25], [0.22])) == approx(175.0)
    assert run("sigmoid", POINT_A[0], POINT_A[1]) == approx(0.6209570)


def test_mixture_with_default_betas_and_sft_next_to_kto():
    """beta=None: each loss uses its own default (diffusion_dpo 5000, mapo 0.1). Point: errθ = (0.30, 0.3002),
    errref = (0.30, 0.3002) → diffusion_dpo = ln 2 at any β; mapo (β_m = 0.1) = 0.3669679 (test_mapo_values A).
    kto + sft (unpaired): sft reads the desirable samples only."""
    p, r = err([0.30], [0.3002]), err([0.30], [0.3002])
    out = compute_loss(["diffusion_dpo", "mapo"], None, p, r)
    assert out.loss.item() == approx(LN2 + 0.3669679)
    assert out.metrics["rewards/margins"].item() == 0.0  # diffusion_dpo's (first wins), not mapo's m
    u = unpaired("logp", [-6.0, -100.0], [True, False], n=[3.0, 1.0])
    out = compute_loss(["kto", "sft"], [1.0, 0.1], u, u.detach(), 0.1)
    assert out.loss.item() == approx(0.5 + 0.1 * 2.0)  # kto sanity 0.5, sft = 6/3 = 2


# ============================================================ metrics


def _check_metric_tensors(out: LossOutput) -> None:
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point(), k
        assert not v.requires_grad, k


def test_diffusion_dpo_metrics():
    """Pairs A (d = 0.07) and a tie (d = 0), β = 100: implicit_acc = (0 + ½)/2 = 0.25;
    rewards/chosen = mean(−50·[0.05, 0]) = −1.25, rewards/rejected = mean(−50·[−0.02, 0]) = 0.5,
    rewards/margins = mean(−50·[0.07, 0]) = −1.75; err means: policy_chosen (0.30 + 0.1)/2 = 0.2."""
    p, r = err([0.30, 0.1], [0.20, 0.1]), err([0.25, 0.1], [0.22, 0.1])
    p.chosen.requires_grad_(True)
    out = compute_loss(["diffusion_dpo"], None, p, r, 100.0)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert set(m) == {
        "err/policy_chosen", "err/policy_rejected", "err/ref_chosen", "err/ref_rejected", "implicit_acc",
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "loss/diffusion_dpo",
    }
    assert m["implicit_acc"] == approx(0.25) and m["rewards/accuracies"] == approx(0.25)
    assert m["rewards/chosen"] == approx(-1.25) and m["rewards/rejected"] == approx(0.5)
    assert m["rewards/margins"] == approx(-1.75)
    assert m["err/policy_chosen"] == approx(0.2) and m["err/ref_rejected"] == approx(0.16)
    _check_metric_tensors(out)


def test_npo_metrics_describe_the_swapped_roles():
    """Pair A under NPO: d' = −0.07, implicit_acc = 1, rewards/margins = −50·(−0.07) = 3.5,
    err/policy_chosen = errθ of the rejected sample = 0.20."""
    out = compute_loss(["npo"], None, err([0.30], [0.20]), err([0.25], [0.22]), 100.0)
    assert out.metrics["implicit_acc"].item() == 1.0
    assert out.metrics["rewards/margins"].item() == approx(3.5)
    assert out.metrics["err/policy_chosen"].item() == approx(0.20)


def test_mapo_metrics():
    """Pairs (0.5, 0.45) and (0.3, 0.3): m = [−0.0115123, 0], implicit_acc = mean(errθ_w < errθ_l, ties ½) = 0.25."""
    out = compute_loss(["mapo"], None, err([0.5, 0.3], [0.45, 0.3]), None)
    assert out.metrics["implicit_acc"].item() == approx(0.25)
    assert out.metrics["rewards/margins"].item() == approx(-0.0115123 / 2)
    assert {"err/policy_chosen", "err/policy_rejected", "rewards/accuracies"} <= set(out.metrics)
    _check_metric_tensors(out)


def test_sequence_metrics():
    """Point A plus a tie pair at β = 0.5: r⁺ = [1, 0], r⁻ = [−0.5, 0]: rewards/chosen = 0.25,
    rewards/rejected = −0.125, rewards/margins = 0.375, accuracies = (1 + 0)/2 = 0.5 (ties count 0),
    logps/chosen = (−10 − 3)/2 = −6.5, logps/rejected = (−12 − 4)/2 = −8."""
    policy = logp([-10.0, -3.0], [-12.0, -4.0])
    reference = logp([-11.0, -3.0], [-11.5, -4.0])
    for name in ("sigmoid", "hinge", "robust", "bco_pair", "sppo_hard"):
        out = compute_loss([name], None, policy, reference, 0.5)
        m = {k: v.item() for k, v in out.metrics.items()}
        assert m["rewards/chosen"] == approx(0.25) and m["rewards/rejected"] == approx(-0.125), name
        assert m["rewards/margins"] == approx(0.375) and m["rewards/accuracies"] == approx(0.5), name
        assert m["logps/chosen"] == approx(-6.5) and m["logps/rejected"] == approx(-8.0), name
        _check_metric_tensors(out)
    out = sigmoid(policy, reference, beta=0.5)
    assert set(out.metrics) == {
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected",
    }


def test_kto_metrics_and_stable_keys():
    """logπθ = [−4, −5], logπref = [−6, −6], β = 0.5: r = [2, 1], z_ref = 1.5; rewards/chosen = 0.5·2 = 1,
    rewards/rejected = 0.5; a batch with only desirable samples still reports rewards/rejected = 0."""
    ref = unpaired("logp", [-6.0, -6.0], [True, False])
    out = kto(unpaired("logp", [-4.0, -5.0], [True, False]), ref, beta=0.5)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["kl"] == approx(1.5)
    assert m["rewards/chosen"] == approx(1.0) and m["rewards/rejected"] == approx(0.5)
    assert m["logps/chosen"] == approx(-4.0) and m["logps/rejected"] == approx(-5.0)
    only_good = compute_loss(["kto"], None, unpaired("logp", [-4.0, -5.0], [True, True]),
                             unpaired("logp", [-6.0, -6.0], [True, True]), 0.5)
    assert set(only_good.metrics) == set(out.metrics) | {"loss/kto"}
    assert only_good.metrics["rewards/rejected"].item() == 0.0
    _check_metric_tensors(only_good)
    d = compute_loss(["diffusion_kto"], None, unpaired("error", [0.2, 0.3], [True, False]),
                     unpaired("error", [0.25, 0.28], [True, False]), 10.0)
    assert d.metrics["err/policy_chosen"].item() == approx(0.2)
    assert d.metrics["err/ref_rejected"].item() == approx(0.28)
    assert d.metrics["rewards/chosen"].item() == approx(10 * 0.05)


def test_minmax_normalise():
    """(t − min)/(max − min): [2, 4, 6] → [0, 0.5, 1]; a constant tensor → zeros."""
    assert minmax_normalise(torch.tensor([2.0, 4.0, 6.0])).tolist() == [0.0, 0.5, 1.0]
    assert minmax_normalise(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]
    assert "once over the dataset by the data step" in " ".join((smpo.__doc__ or "").split())


def test_half_precision_scores_are_upcast():
    """bfloat16 errors give a float32 loss equal to the float32 computation."""
    p32, r32 = err([0.30], [0.20]), err([0.25], [0.22])
    pb = Scores("error", p32.chosen.bfloat16(), p32.rejected.bfloat16())
    rb = Scores("error", r32.chosen.bfloat16(), r32.rejected.bfloat16())
    out = compute_loss(["diffusion_dpo"], None, pb, rb, 100.0)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
