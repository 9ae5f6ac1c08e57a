"""Central evaluation on the device and the CPU: loss plus greedy generation.

Times :meth:`server.evaluation.CentralEvaluator.evaluate` (the server's
per-round evaluation: the reference answers' token cross-entropy, then
batched greedy generation scored by the task metric) on built-in tasks, with
the base model the scale names: on the device for the scale's examples after
an untimed warm-up batch, and on the CPU for fewer examples, with the same
settings.
"""

from __future__ import annotations

from typing import Any

from bench.gpu.figures import figure, timed
from bench.gpu.scales import EvalScale

__all__ = ["section_eval"]

EVALUATE = "server.evaluation.CentralEvaluator.evaluate"
METRIC = "rouge_l"


def _run(model: Any, tokenizer: Any, scale: EvalScale, n: int, device: Any) -> Any:
    """Build an evaluator for ``n`` examples on ``device``; warm up; time one pass."""
    from corpora import generate_tasks
    from server.evaluation import CentralEvaluator

    def evaluator(count: int) -> CentralEvaluator:
        return CentralEvaluator(
            model,
            tokenizer,
            generate_tasks(count, seed=0),
            metric=METRIC,
            max_length=scale.max_length,
            max_new_tokens=scale.max_new_tokens,
            batch_size=scale.batch_size,
            device=device,
        )

    evaluator(min(n, 2)).evaluate()  # untimed: kernels, caches, allocator
    ev = evaluator(n)
    box: list[Any] = []
    seconds = timed(lambda: box.append(ev.evaluate()), device)
    return seconds, box[0]


def _figure(
    label: str, device: Any, scale: EvalScale, n: int, seconds: float, result: Any
) -> dict[str, Any]:
    return figure(
        f"{EVALUATE} ({label})",
        device,
        f"{n} built-in task examples, {scale.model}, max_length "
        f"{scale.max_length}, {scale.max_new_tokens} new tokens, batch "
        f"{scale.batch_size}",
        seconds,
        n / seconds,
        "examples/s",
        examples=n,
        loss=float(result.loss),
        metric=float(result.metric),
        metric_name=str(result.metric_name),
    )


def section_eval(scale: EvalScale, device: Any) -> dict[str, Any]:
    """Evaluation figures: the CPU reference first, then the device run.

    Returns
    -------
    dict[str, Any]
        ``function``, ``model``, ``load_s`` and ``device_load_s`` (loading
        the model on the CPU, then on the device) and ``runs`` (figures; the
        device run first).
    """
    import torch

    from bench.harness import now
    from models import load_causal_lm

    t0 = now()
    loaded = load_causal_lm(scale.model, dtype="float32", device="cpu")
    load_s = now() - t0  # the first load of SmolLM2 also converts it (once)
    cpu_s, cpu_result = _run(
        loaded.model, loaded.tokenizer, scale, scale.cpu_examples, torch.device("cpu")
    )
    del loaded
    dev = torch.device(device)
    t0 = now()
    on_dev = load_causal_lm(scale.model, dtype="float32", device=dev)
    dev_load_s = now() - t0
    dev_s, dev_result = _run(on_dev.model, on_dev.tokenizer, scale, scale.examples, dev)
    label = "device" if dev.type != "cpu" else "primary run"
    return {
        "function": EVALUATE,
        "model": scale.model,
        "load_s": load_s,
        "device_load_s": dev_load_s,
        "target": "seconds per evaluation, to set against a round's training time",
        "runs": [
            _figure(label, dev, scale, scale.examples, dev_s, dev_result),
            _figure(
                "CPU, reduced scale",
                "cpu",
                scale,
                scale.cpu_examples,
                cpu_s,
                cpu_result,
            ),
        ],
    }
