"""The sizes ``bench.gpu`` measures at: a LLaMA-3B round on a GPU, or a CPU smoke.

Every figure the check writes names the scale it ran at, so a reader can set
it beside its target: :data:`GPU` is what ``bench/gpu_check.sh`` times on one
GPU (with smaller CPU references, labelled as such); :data:`SMOKE` runs every
timing in seconds on a CPU (``--cpu-smoke``), to check the script, not the
hardware. Its budgets are zero, so it takes the extrapolation paths a GPU
run takes when the full round does not fit its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "SMOKE", "CheckScale", "EvalScale", "LoraScale", "ReplayScale"]


@dataclass(frozen=True, slots=True)
class ReplayScale:
    """A FedKSeed server replay: ``seeds`` distinct seeds over synthetic tensors.

    Attributes
    ----------
    tensors, rows, cols : int
        ``tensors`` float32 tensors of shape ``(rows, cols)`` on the device.
    seeds : int
        Distinct seeds of the round (the target's D).
    budget_s : float
        Seconds the timed replay may take: when the calibrated cost of all
        ``seeds`` exceeds it, fewer seeds are replayed and the round is
        extrapolated (linear in seeds), and the figure says so.
    target_s : float
        The goal for the whole round on the device.
    cpu_tensors, cpu_seeds : int
        The CPU reference: that many tensors of the same shape, that many seeds.
    """

    tensors: int
    rows: int
    cols: int
    seeds: int
    budget_s: float
    target_s: float
    cpu_tensors: int
    cpu_seeds: int

    @property
    def params(self) -> int:
        """Parameters replayed on the device."""
        return self.tensors * self.rows * self.cols


@dataclass(frozen=True, slots=True)
class EvalScale:
    """Central evaluation (loss and greedy generation) of built-in tasks.

    Attributes
    ----------
    model : str
        A name :func:`models.load_causal_lm` resolves.
    examples, cpu_examples : int
        Held-out examples scored on the device and on the CPU reference.
    max_length, max_new_tokens, batch_size : int
        The evaluator's settings (the same on both devices).
    """

    model: str
    examples: int
    cpu_examples: int
    max_length: int
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class LoraScale:
    """One LoRA round: ``clients`` adapters on q and v of ``layers`` layers.

    Attributes
    ----------
    layers, hidden, v_out : int
        q_proj is ``(hidden, hidden)``, v_proj ``(v_out, hidden)`` per layer.
    clients, rank : int
        Adapters aggregated, each of this rank (the global rank too).
    alpha : float
        LoRA alpha.
    svd_budget_s, cpu_svd_budget_s : float
        Seconds FlexLoRA (one SVD per module) may take on the device and on
        the CPU: one layer is timed first, and when all of them would take
        longer, as many layers as fit are timed and the round is extrapolated
        per layer (the figure says so).
    """

    layers: int
    hidden: int
    v_out: int
    clients: int
    rank: int
    alpha: float
    svd_budget_s: float
    cpu_svd_budget_s: float


@dataclass(frozen=True, slots=True)
class CheckScale:
    """Everything one run of the check measures."""

    name: str
    replay: ReplayScale
    eval: EvalScale
    lora: LoraScale


# LLaMA-3.2-3B: 28 layers, hidden 3072, 8 KV heads of 128 (v_proj 3072 -> 1024).
# Replay: 28 tensors of 3072 x 34880 = 3,000,238,080 parameters, 12 GB float32,
# the server's w0 dtype (server.zo_driver keeps w0 in float32).
GPU = CheckScale(
    name="gpu",
    replay=ReplayScale(
        tensors=28,
        rows=3072,
        cols=34880,
        seeds=1000,
        budget_s=45.0,
        target_s=12.0,
        cpu_tensors=1,
        cpu_seeds=8,
    ),
    eval=EvalScale(
        model="smollm2-135m",
        examples=256,
        cpu_examples=16,
        max_length=128,
        max_new_tokens=32,
        batch_size=64,
    ),
    lora=LoraScale(
        layers=28,
        hidden=3072,
        v_out=1024,
        clients=10,
        rank=16,
        alpha=32.0,
        svd_budget_s=25.0,
        cpu_svd_budget_s=8.0,
    ),
)

SMOKE = CheckScale(
    name="cpu-smoke",
    replay=ReplayScale(
        tensors=4,
        rows=16,
        cols=64,
        seeds=8,
        budget_s=0.0,
        target_s=12.0,
        cpu_tensors=1,
        cpu_seeds=4,
    ),
    eval=EvalScale(
        model="tiny-llama",
        examples=6,
        cpu_examples=3,
        max_length=48,
        max_new_tokens=4,
        batch_size=4,
    ),
    lora=LoraScale(
        layers=2,
        hidden=48,
        v_out=16,
        clients=3,
        rank=4,
        alpha=8.0,
        svd_budget_s=0.0,
        cpu_svd_budget_s=0.0,
    ),
)
