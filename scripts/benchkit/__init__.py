"""The parts of scripts/bench.py, the benchmark of the recipe's GRPO steps; bench.py is its one entry point.

  flops.py          FLOPs of a training micro-batch, the datasheet peaks, and the utilisation figures (MFU, HFU)
  recorder.py       per-rank phase timers, memory peaks and counters: one JSON line per optimizer step
  vllm_stand_in.py  TRL's vLLM colocate path with the engine replaced, for machines without vLLM
  worker.py         one process of `accelerate launch`: timers installed, then the training script's own stages
  micro.py          the micro-benchmarks run as children: bf16 matmul rate, vision tower, image preprocessing
  runner.py         the parent: the configurations, one `accelerate launch` each, GPU memory polling, bench.json
  report.py         per-rank records -> throughput, utilisation and memory; the Markdown tables; --refigure
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "code" / "vlm-grpo"
ENTRY = REPO / "scripts" / "bench.py"  # every child (ranks, micro-benchmarks) re-enters the one entry point
